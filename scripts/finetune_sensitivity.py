"""Why a short fine-tune of a small pretrained encoder learns or not: the measurements behind the `:cpu`
fine-tuning recipe (mefem_jax/finetuning/config.py apply_cpu; docs/RESULTS.md, "Fine-tuning").

    python scripts/finetune_sensitivity.py [--init=runs/long/mefem_s0] [--labels=runs/long/labels.csv]

On N train faces of the carved split (a fixed sample) and the validation split, it prints:
1. the CLS features' spread over faces against their size (one augmented view per face);
2. how far drop path moves them, in units of that spread;
3. how much gender a probe finds in the features of crops of 0.3-1, 0.8-1 and of whole faces
   (5-fold cross-validated ROC-AUC of an L2 logistic regression on standardised features);
4. LP-FT's drift: a ridge / logistic probe fitted on the frozen features as the head, then 20 real
   fine-tuning steps (finetuning/step.py) at encoder lr 1e-5, with the head's input standardisation fixed:
   how far the validation features move (in spreads) and what that does to the validation age MAE.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import finetune as finetune_configs  # noqa: E402
from mefem_jax.data import device_augment  # noqa: E402
from mefem_jax.finetuning import labelled_data, linear_head, outputs as outputs_lib, step as step_lib  # noqa: E402
from mefem_jax.finetuning.model import Classifier, readout  # noqa: E402
from mefem_jax.weights import encoders  # noqa: E402

TARGETS = "age:regression,gender:classification"


def _config(init_cfg, crop_scale, **more):
    c = finetune_configs.get_config("cpu")
    c.unlock()
    c.model = init_cfg
    c.model.update(scan_layers=False, remat=False)
    c.update_from_flattened_dict({"data.crop_scale": crop_scale, **more})
    return c


def _gender_auc(features: np.ndarray, gender: np.ndarray, stats: dict) -> float:
    z = (features - stats["input_mean"]) / stats["input_std"]
    probe = LogisticRegression(C=0.1, max_iter=2000)
    return float(cross_val_score(probe, z, gender, cv=5, scoring="roc_auc").mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="runs/long/mefem_s0")
    parser.add_argument("--labels", default="runs/long/labels.csv")
    parser.add_argument("--images", default="../shared/data/utkface/images")
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()

    loaded = encoders.load_encoder(args.init)
    spec = f"{args.labels}:images={args.images},"
    c = _config(loaded.model_cfg, (0.8, 1.0))
    train = labelled_data.load_split(spec + f"split=train,sample={args.n}",
                                     device_augment.input_size(c.data, c.model.image_size), "train")
    val = labelled_data.load_split(spec + "split=val,sample=400", c.model.image_size, "val")
    outputs = outputs_lib.plan_outputs(outputs_lib.parse_fine_tune_targets(TARGETS), train.labels)
    y_train = outputs_lib.encode_labels(outputs, train.labels)
    gender = y_train[:, 1]
    key = jax.random.PRNGKey(0)

    views = {}
    for crop in ((0.3, 1.0), (0.8, 1.0)):
        pieces = step_lib.build(_config(loaded.model_cfg, crop), outputs)
        views[crop] = step_lib.features(pieces, loaded.params, train.images, 100, augment=key)
    whole = step_lib.features(pieces, loaded.params, train.images, 100)
    stats = linear_head.input_stats(views[(0.8, 1.0)])
    print(f"1. CLS features over {args.n} faces (crops of 0.8-1): median std {np.median(stats['input_std']):.4f}, "
          f"median |mean| {np.median(np.abs(stats['input_mean'])):.3f}")

    # 2. drop path 0.1, as MAE's recipe trains: the same crops, the encoder in training mode
    model = Classifier(pieces.model.encoder.clone(drop_path=0.1), pieces.model.num_logits)
    noisy = jax.jit(lambda p, x, k: readout(model.apply({"params": {"encoder": p}}, pieces.prepare_images(x, k),
                                                        method=lambda m, x: m.encoder(x, deterministic=False),
                                                        rngs={"dropout": jax.random.fold_in(k, 1)}), "cls"))
    dropped = np.concatenate([np.asarray(noisy(loaded.params, train.images[i:i + 100], jax.random.fold_in(key, i)))
                              for i in range(0, len(train.images), 100)])
    moved = (dropped - views[(0.8, 1.0)]) / stats["input_std"]
    print(f"2. drop path 0.1 moves them by a median {np.median(np.abs(moved)):.2f} spreads "
          f"(their spread under drop path: {np.median(dropped.std(0) / stats['input_std']):.1f}x)")

    aucs = {f"crops {a}-{b}": _gender_auc(v, gender, linear_head.input_stats(v)) for (a, b), v in views.items()}
    aucs["whole faces"] = _gender_auc(whole, gender, linear_head.input_stats(whole))
    print("3. gender, cross-validated ROC-AUC: " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()))

    # 4. LP-FT's drift with a fixed input standardisation
    c = _config(loaded.model_cfg, (0.8, 1.0), **{"optim.lr": 4e-5, "optim.warmup_steps": 8, "total_steps": 80,
                                                 "head.standardize": "fixed", "head.init": "probe"})
    pieces = step_lib.build(c, outputs)
    features = views[(0.8, 1.0)]
    head = linear_head.fit_head(features, y_train, outputs, stats)
    weights = np.abs(head['kernel'][:, 0])
    print(f"4. LP-FT: the age probe's weights on the standardised features sum to {weights.sum():.1f} "
          f"in absolute value (largest {weights.max():.2f}) over {features.shape[1]} dimensions")
    params = {"encoder": loaded.params, "head": dict(head, **stats)}
    state = step_lib.FinetuneState(step=jnp.zeros((), jnp.int32), params=params, opt_state=pieces.tx.init(params),
                                   rng=key)
    train_step, predict = jax.jit(step_lib.make_train_step(pieces)), step_lib.make_predict(pieces)
    val_start = step_lib.features(pieces, loaded.params, val.images, 100)
    ages = np.asarray(val.labels["age"], np.float64)
    rng = np.random.default_rng(0)
    for t in range(21):
        if t in (0, 2, 5, 10, 20):
            now = step_lib.features(pieces, state.params["encoder"], val.images, 100)
            shift = (now - val_start) / stats["input_std"]
            age = step_lib.in_batches(predict, state.params, val.images, 100)[:, 0] * outputs[0].std + outputs[0].mean
            shared = np.median(np.abs(shift.mean(0)))
            print(f"   step {t:2d}: validation features moved by a median {shared:.3f} spreads "
                  f"(shared shift), {np.median(shift.std(0)):.3f} (per face); validation age MAE "
                  f"{np.abs(age - ages).mean():.2f}, mean prediction {age.mean():.1f} (true {ages.mean():.1f})")
        rows = rng.choice(len(train.images), 64, replace=False)
        state, _ = train_step(state, {"image": train.images[rows], "labels": y_train[rows].astype(np.float32)})


if __name__ == "__main__":
    main()
