"""Warren's benchmark harness: `make bench` (QUICK=1 for a short run).

Runs each benchmark against a direct connection, HAProxy and Warren
alternately, several rounds, and writes bench/RESULTS.md, bench/results.json
and bench/ratios.png. See bench/README.md.
"""
