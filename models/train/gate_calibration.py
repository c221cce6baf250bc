"""The quality gate against learn v2's evaluation: how many results worse than doing nothing pass
unflagged, per review_threshold and min_validated_gain_db.

    models/train/.venv/bin/python models/train/gate_calibration.py models/eval_cli.json
"""
import json
import re
import sys
rows = json.load(open(sys.argv[1]))
rows = rows['quads'] if isinstance(rows, dict) else rows
data = []
for r in rows:
    if r.get('kind') != 'main' or 'takumi' not in r: continue
    m = re.search(r'score ([0-9.]+)', r.get('apply_line', ''))
    if not m: continue
    gain = r['card'].get('validated_gain_db')
    data.append((float(m.group(1)), gain, r['takumi'] < r['identity'] - 1e-9, r['set']))
n = len(data); harm = sum(d[2] for d in data)
print(f"{n} results, {harm} harmful ({100*harm/n:.1f}%)")
for th in [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 1.0]:
    for g in [0.5, 1.0, 2.0, 3.0]:
        passed = [d for d in data if d[0] <= th and (d[1] is not None and d[1] >= g)]
        hp = sum(d[2] for d in passed)
        print(f"threshold {th:.2f} min_gain {g:.1f}: {len(passed)} pass unflagged, {hp} harmful = {100*hp/max(1,n):.1f}% of all results, {100*hp/max(1,len(passed)):.1f}% of passed; harmful sets {[d[3] for d in passed if d[2]]}")
