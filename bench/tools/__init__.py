"""Small load and backend programs the benchmarks run as separate processes.

Each speaks JSON lines on stdout (`{"event": ...}`) and, where it waits for
instructions, reads JSON lines on stdin; `bench.procs.read_event` /
`send_line` are the other end.
"""
