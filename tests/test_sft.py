"""The SFT warm start: it stops at its validation target, and its cache is shared
by every regime, keyed by the SFT config and the thread count; a cache that cannot
be written is found before the SFT runs, and the weights stay in the run."""
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
    for change in ({"sft_lr": 1e-3}, {"seed": 1}, {"d_model": 16}, {"n_mtp": 2}, {"dtype": "float64"},
                   {"threads": torch.get_num_threads() + 1}):
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


def test_sft_cache_key_holds_the_thread_count(tiny):
    """The weights change with the thread count in their last bits, so the key holds it
    (which changed every key of the caches written before it did). Pinned: the default
    preset's micro seeds (the CI cache, one thread per run), the defaults on one and
    two threads, and the tiny test config on one thread."""
    base = micro(PRESETS["default"]).base
    assert base.threads == 1
    assert [sft_hash(base.with_values(seed=s)) for s in (0, 1, 2)] == [
        "459f29d01e61b376", "3c683833f3bbd41e", "c59ae02272f42254"
    ]
    assert sft_hash(TrainConfig(threads=1)) == "e11f813196f5dae7"
    assert sft_hash(TrainConfig(threads=2)) == "bec48d04bcca65bb"
    assert sft_hash(tiny(threads=1)) == "2a6e04307ff38db7"
    # no thread count: the one torch uses now
    assert sft_hash(tiny()) == sft_hash(tiny(threads=torch.get_num_threads()))


def test_a_read_only_sft_cache_keeps_the_weights_in_the_run_and_warns(tiny, tmp_path):
    import json

    from mtpdiag.train import train

    blocker = tmp_path / "blocker"
    blocker.write_text("")  # a cache folder under a file cannot be created, even by root
    cfg = tiny(steps=1)
    with pytest.warns(UserWarning, match=f"the SFT cache {blocker / 'cache' / 'sft'} cannot be written .*kept in "
                                         f"{tmp_path / 'run' / 'sft'} instead"):
        train(cfg, tmp_path / "run", cache_dir=blocker / "cache", progress=False)
    kept = tmp_path / "run" / "sft" / f"{sft_hash(cfg.with_values(threads=torch.get_num_threads()))}.pt"
    assert kept.exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sft"]["sft_cache_file"] == str(kept)
