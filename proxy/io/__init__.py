"""I/O plumbing of the data path: how bytes move, not what they mean.

- ``poller``: the relays' one epoll and timer heap per trio run;
  ``trio_nesting``: serving it from inside trio's own I/O wait (the one
  module that reads trio internals, behind a version gate);
- ``pipes``: the pipe pool for splice;
- ``relay``: the pump between a client socket and a broker socket (a link
  of the poller), ``directions``: how one direction moves bytes (copy or
  splice);
- ``sockmap``: the kernel data path: a socket map whose verdict program
  relays a pair of sockets inside the kernel, and its start-up self-test;
  ``bpf``: the bpf(2) system call and an assembler for its instructions;
  ``kernel_relay``: the poller's link for a pair the kernel relays.

Frontends (accept, sessions) and backends (choose, connect) use these; this
package knows nothing of configuration, servers or sessions.
"""
