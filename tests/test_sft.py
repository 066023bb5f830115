"""The SFT warm start: it stops at its validation target, and its cache is shared
by every regime, keyed by the SFT config alone, under the same key as before the
trainer was split (so existing caches stay valid)."""
import pytest
import torch

from mtpdiag.config import TrainConfig, build_task
from mtpdiag.experiment import PRESETS, micro
from mtpdiag.sft import run_sft, sft_cache_file, sft_hash, warm_start


def test_sft_cache_is_shared_by_every_regime_and_keyed_by_the_sft_config(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MTPDIAG_CACHE", str(tmp_path / "env-cache"))
    cfg = tiny(sft_steps=5)
    task = build_task(cfg)
    first, info = warm_start(cfg, task, progress=False)
    assert info["sft_cache_file"].startswith(str(tmp_path / "env-cache" / "sft"))
    rl_only = cfg.with_values(regime="policy", lam=0.2, steps=99, lr=0.5, eval_every=7, diag_every=3, diag_per_block=False)
    assert sft_cache_file(rl_only) == sft_cache_file(cfg)
    second, _ = warm_start(rl_only, task)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    for change in ({"sft_lr": 1e-3}, {"seed": 1}, {"d_model": 16}, {"n_mtp": 2}, {"dtype": "float64"}):
        assert sft_cache_file(cfg.with_values(**change)) != sft_cache_file(cfg), change
    assert sft_cache_file(cfg, tmp_path / "flag").parent == tmp_path / "flag" / "sft"
    assert [p.name for p in (tmp_path / "env-cache" / "sft").iterdir()] == [f"{sft_hash(cfg)}.pt"]  # no temporary left


def test_sft_stops_once_validation_j_true_reaches_the_target(tiny):
    cfg = tiny(sft_steps=400, sft_target=0.2, sft_eval_every=10, sft_lr=1e-2)
    _, summary = run_sft(cfg, build_task(cfg), progress=False)
    assert summary["sft_val_j_true"] >= 0.2
    assert summary["sft_steps_run"] < 400 and summary["sft_steps_run"] % 10 == 0
    with pytest.warns(UserWarning, match="SFT ran all sft_steps=20 .* short of sft_target=0.9: raise --sft-steps"):
        run_sft(tiny(sft_steps=20, sft_target=0.9, sft_eval_every=10), build_task(cfg), progress=False)


def test_sft_cache_key_is_the_one_before_the_config_split(tiny):
    """The keys the flat TrainConfig gave before it held a GPTConfig (computed at
    commit 1f85014): the default preset's micro seeds (the CI cache), the defaults,
    and the tiny test config."""
    base = micro(PRESETS["default"]).base
    assert [sft_hash(base.with_values(seed=s)) for s in (0, 1, 2)] == [
        "8cefd68f6ae324aa", "461fe536c22cb6fe", "dbd835d2e3718fee"
    ]
    assert sft_hash(TrainConfig()) == "90730a77efb0cb29"
    assert sft_hash(tiny()) == "de72bd802a633c26"
