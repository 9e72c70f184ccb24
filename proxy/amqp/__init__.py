"""AMQP awareness of relayed connections: who is connected, and what to do about it.

Sans-I/O cores, time passed in (tested exhaustively without sockets):

- :mod:`.inspect`: the passive, bounded reader of an AMQP 0-9-1 handshake
  (both directions), built on the health checks' codec;
- :mod:`.closing`: was a connection's end an AMQP Close/Close-Ok exchange
  (RabbitMQ resets its sockets even then);
- :mod:`.heartbeat`: idle limits derived from the negotiated heartbeat;
- :mod:`.admission`: token buckets for new connections, connection limits
  per vhost and per user;
- :mod:`.rebalance`: which connections to close so a returned broker gets
  its share.

:mod:`.tap` is the thin layer that feeds a relay's bytes to the inspector.
"""
