"""Shared fixtures: the tiny trainer config (1-digit addition, a 1-layer d=32 GPT) and a briefly SFT-trained model."""
import pytest

from mtpdiag.config import TrainConfig, build_task
from mtpdiag.sft import run_sft

TINY = dict(
    task_options={"digits": 1}, block_size=8, d_model=32, n_layer=1, n_head=2,
    sft_steps=100, sft_target=None, sft_batch_size=32, sft_lr=3e-3,
    steps=6, prompts_per_step=4, group_size=4, lr=1e-3, eval_every=3, eval_prompts=12, eval_samples=2,
    checkpoint_every=2,
)  # fmt: skip


@pytest.fixture(scope="session")
def tiny():
    """``tiny(**flat_overrides)``: the tiny TrainConfig with some flat keys changed."""
    return lambda **overrides: TrainConfig.from_dict(TINY | overrides)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An SFT cache shared by one test module's runs."""
    return tmp_path_factory.mktemp("sft-cache")


@pytest.fixture(scope="session")
def sft_model(tiny):
    """A briefly trained float64 model on 1-digit addition, its task and config."""
    cfg = tiny(dtype="float64")
    task = build_task(cfg)
    model, _ = run_sft(cfg, task, progress=False)
    return model.eval(), task, cfg
