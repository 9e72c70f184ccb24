"""The stats page's stylesheet, inlined in every page (one request, no assets).

State colours follow what HAProxy users read at a glance: green UP, yellow
"UP, going down", orange "DOWN, going up", red DOWN, blue DRAIN, grey MAINT.
Rows are tinted; the status pill carries the strong colour and its text, so
the state is never told by colour alone.
"""

STYLESHEET = """
:root{--up:#2e9e44;--up-bg:#e9f7ec;--gd:#d9a400;--gd-bg:#fff7d1;--gu:#ec8a00;--gu-bg:#ffead0;
--down:#d23a3a;--down-bg:#fde6e6;--drain:#2f7fd8;--drain-bg:#e4efff;--maint:#6b7088;--maint-bg:#ecebf2;
--nocheck:#6f9b7c;--nocheck-bg:#f2f6f3;--line:#d5dae2;--head:#e9edf3;--ink:#1c232c;--muted:#5d6778}
*{box-sizing:border-box}
body{margin:0;background:#f5f6f8;color:var(--ink);font:13px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{padding:0 16px 24px;max-width:1600px;margin:0 auto}
header{background:#1f2937;color:#f3f4f6;margin:0 -16px 16px;padding:12px 16px;display:flex;flex-wrap:wrap;
align-items:center;gap:8px 28px}
header h1{margin:0;font-size:20px;font-weight:650;letter-spacing:.2px}
header .version{font-size:13px;font-weight:400;color:#9ca3af}
.facts{display:flex;flex-wrap:wrap;gap:4px 20px;margin:0}
.facts div{display:flex;gap:6px;align-items:baseline}
.facts dt{color:#9ca3af;font-size:11px;text-transform:uppercase;letter-spacing:.4px}
.facts dd{margin:0;font-weight:600;font-variant-numeric:tabular-nums}
nav{margin-left:auto;display:flex;gap:18px;color:#d1d5db}
nav a{color:#93c5fd}
h2{font-size:15px;margin:20px 0 8px;display:flex;align-items:center;gap:8px}
h2 small{font-weight:400;color:var(--muted)}
.notice{background:#e0f2fe;border:1px solid #7dd3fc;padding:8px 12px;border-radius:6px;margin:0 0 12px}
.notice.error{background:#fee2e2;border-color:#fca5a5}
.scroll{overflow-x:auto;margin:0 0 12px}
table{border-collapse:collapse;background:#fff;border:1px solid var(--line);font-variant-numeric:tabular-nums}
table.proxy{min-width:min(100%,960px)}
table.frontend{min-width:420px}
caption{text-align:left;font-weight:600;padding:4px 0;font-size:14px}
caption small{font-weight:400;color:var(--muted)}
.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
th,td{border:1px solid var(--line);padding:3px 5px;white-space:nowrap}
thead th{background:var(--head);font-weight:600;font-size:12px;text-align:center}
tbody th,tfoot th{text-align:left;font-weight:600}
tbody th small{display:block;font-weight:400;color:var(--muted);font-size:11px}
td.num{text-align:right}
td.flag{text-align:center}
td.check{font-size:12px;white-space:normal;min-width:150px;max-width:200px}
td.check small{color:var(--muted)}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px;color:#fff;
background:var(--muted)}
tr.up{background:var(--up-bg)} tr.up .pill,.legend .up .pill,.badge.up{background:var(--up)}
tr.open .pill,tr.vip-master .pill{background:var(--up)}
tr.going-down{background:var(--gd-bg)} tr.going-down .pill,.legend .going-down .pill{background:var(--gd);color:#1c232c}
tr.going-up{background:var(--gu-bg)} tr.going-up .pill,.legend .going-up .pill{background:var(--gu)}
tr.down{background:var(--down-bg)} tr.down .pill,.legend .down .pill,.badge.down,tr.vip-fault .pill{background:var(--down)}
tr.drain{background:var(--drain-bg)} tr.drain .pill,.legend .drain .pill,tr.vip-backup .pill{background:var(--drain)}
tr.maint{background:var(--maint-bg);color:#4b5060} tr.maint .pill,.legend .maint .pill{background:var(--maint)}
tr.nocheck{background:var(--nocheck-bg)} tr.nocheck .pill,.legend .nocheck .pill{background:var(--nocheck)}
tr.total{background:var(--head);font-weight:600}
tr.vip-fault{background:var(--down-bg)} tr.vip-master{background:var(--up-bg)}
.badge{color:#fff;font-size:11px;padding:1px 7px;border-radius:9px;background:var(--muted)}
.charts{display:flex;flex-wrap:wrap;gap:10px;margin:0 0 8px}
svg.chart{background:#fff;border:1px solid var(--line);border-radius:4px;display:block}
svg.chart .plot{fill:#fbfcfd}
svg.chart .grid{stroke:#e5e7eb;stroke-dasharray:3 3}
svg.chart polyline{fill:none;stroke-width:1.6;stroke-linejoin:round}
svg.chart .s-sessions{stroke:#2563eb} svg.chart .s-in{stroke:#059669} svg.chart .s-out{stroke:#d97706}
svg.chart text{font-size:10px;fill:var(--muted)}
td.admin form{display:flex;flex-wrap:wrap;gap:3px;align-items:center;margin:0;max-width:172px}
td.admin .sep{display:none}
td.admin button{font:inherit;font-size:11px;padding:1px 5px;border:1px solid #b8c0cc;border-radius:4px;
background:#fff;cursor:pointer}
td.admin button:hover{background:#eef2f7}
td.admin button.danger{color:#b42318;border-color:#f1a9a0}
td.admin input[type=number]{width:3.6em;font:inherit;font-size:11px;padding:1px 3px}
footer{margin-top:16px;color:var(--muted)}
.legend{list-style:none;display:flex;flex-wrap:wrap;gap:6px;padding:0;margin:0}
@media (prefers-reduced-motion:no-preference){td.admin button{transition:background .1s}}
"""
