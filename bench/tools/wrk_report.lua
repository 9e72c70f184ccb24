-- wrk script: at the end, print one JSON line (prefixed "WRKJSON ") with the
-- request count, duration, errors and latency percentiles in microseconds,
-- so the harness does not have to parse wrk's human-readable summary.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %.1f, "p90": %.1f, "p99": %.1f, "mean": %.1f, "max": %.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
