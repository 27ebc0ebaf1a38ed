"""Bootstrap ROC-AUC intervals: the rank-sum path of evaluation/bootstrap.py against one sklearn call per
resample (what it replaced), side by side in one process, medians of 3. `python benchmarks/bootstrap_auc.py`."""
import time, numpy as np
from sklearn.metrics import roc_auc_score
from mefem_jax.evaluation import bootstrap
rng = np.random.default_rng(0); n = 4728
for c in (2, 5):
    y = rng.integers(0, c, n); s = rng.dirichlet(np.ones(c), n)
    idx = bootstrap._resamples(n, 1000, 0)
    def loop():  # the per-resample sklearn calls this replaced
        out = []
        for i in idx:
            yi, si = y[i], s[i]
            out.append(roc_auc_score(yi, si[:, 1]) if c == 2
                       else np.mean([roc_auc_score(yi == k, si[:, k]) for k in np.unique(yi)]))
        return np.array(out)
    times = {}
    ways = (("sklearn per resample", loop), ("rank sums, all resamples", lambda: bootstrap._resampled_aucs(y, s, idx)))
    for name, f in ways:
        ts = []
        for _ in range(3):
            t = time.perf_counter(); r = f(); ts.append(time.perf_counter() - t)
        times[name] = (np.median(ts), r)
    a, b = times.values()
    print(f"{c} classes, {n} rows, 1000 resamples: sklearn {a[0]:.2f} s, rank sums {b[0]:.2f} s, "
          f"x{a[0]/b[0]:.1f}, max |diff| {np.max(np.abs(a[1]-b[1])):.1e}")
