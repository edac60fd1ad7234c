"""The Lightning and Hugging Face GeometryCallbacks (issue 25) with the real libraries: records written, training
bit for bit the same with and without the callback, the Hessian through GPT-2's SDPA attention on the math backend."""
import re
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from torch import nn

import batchgap
from batchgap.landscape.objective import ATTENTION_NOTE
from batchgap.tracklog import read_records

ROOT = Path(__file__).resolve().parent.parent
transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")
# transformers.Trainer needs accelerate, pinned in the huggingface and dev extras since this change: a venv made
# before it lacks it until `pip install -e .[dev]` (scripts/bootstrap.sh --dev) runs again
needs_accelerate = pytest.mark.skipif(find_spec("accelerate") is None, reason="transformers.Trainer needs accelerate: "
                                      "pip install -e .[dev] (pinned in the huggingface extra)")


def doc_block(name: str) -> str:
    page = (ROOT / "docs" / "track.md").read_text(encoding="utf8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if b.startswith(f"# {name}")]
    return block


# -- Hugging Face ------------------------------------------------------------------------------------------------
def gpt2_rows():
    text = (ROOT / "docs" / "track.md").read_text(encoding="utf8")  # offline text
    ids = torch.tensor([ord(c) % 64 for c in text[: 16 * 32]]).reshape(32, 16)
    ids[0, 12:] = 0
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0  # one padded row: its labels are ignored (-100)
    labels = ids.masked_fill(mask == 0, -100)
    return [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)]


def train_gpt2(tmp_path, callback=None):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16))
    assert model.config._attn_implementation == "sdpa"
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=8,
                             use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=gpt2_rows(), callbacks=[callback] if callback else [])
    out = trainer.train()
    return model, out.training_loss


@needs_accelerate
def test_huggingface_callback_records_and_leaves_training_unchanged(tmp_path):
    from batchgap.integrations.huggingface import GeometryCallback

    rows = gpt2_rows()
    measure_on = [{k: torch.stack([r[k] for r in rows[i : i + 8]]) for k in rows[0]} for i in (0, 8)]
    plain, plain_loss = train_gpt2(tmp_path)
    cb = GeometryCallback(measure_on, every=2, objective=batchgap.huggingface_objective(causal_lm=True),
                          measures=["loss", "lambda_max"], options={"lambda_max": {"max_hvp": 6}},
                          out=tmp_path / "gpt2.jsonl")
    tracked, tracked_loss = train_gpt2(tmp_path, cb)
    assert tracked_loss == plain_loss
    for (n, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items()):
        assert torch.equal(a, b), n
    records = read_records(tmp_path / "gpt2.jsonl")
    assert [r["step"] for r in records] == [2, 4] and records == cb.records
    lam, loss = records[0]["measures"]["lambda_max"], records[0]["measures"]["loss"]
    assert lam["attention"] == ATTENTION_NOTE and lam["unit"] == "token" and lam["start"] == "cold"
    assert records[1]["measures"]["lambda_max"]["start"] == "warm"
    assert loss["n"] == 16 * 15 - 4  # tokens scored: 15 per row after the shift, less the padded row's 4
    assert lam["n"] == loss["n"] and lam["eigenvalues"][0] == lam["value"]


def test_the_hessian_through_sdpa_equals_the_math_attention_model(tmp_path):
    """The same GPT-2 with eager attention (no SDPA at all): the same top eigenvalue, no attention note."""
    from transformers import GPT2Config, GPT2LMHeadModel

    rows = gpt2_rows()[:8]
    batch = [{k: torch.stack([r[k] for r in rows]) for k in rows[0]}]
    values = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16, attn_implementation=impl)
        model = GPT2LMHeadModel(config).double()
        t = batchgap.track(model, [{k: v for k, v in batch[0].items()}], objective="huggingface-causal-lm",
                           measures=["lambda_max"], options={"lambda_max": {"max_hvp": 30, "tol": 1e-8}})
        values[impl] = t.measure(1)["measures"]["lambda_max"]
    assert values["sdpa"]["attention"] == ATTENTION_NOTE and values["eager"]["attention"] is None
    assert values["sdpa"]["value"] == pytest.approx(values["eager"]["value"], rel=1e-7)


@needs_accelerate
def test_the_huggingface_example_in_docs_track_md_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(doc_block("huggingface"), "docs/track.md", "exec"), ns)
    assert [r["step"] for r in read_records(tmp_path / "gpt2.jsonl")] == [2, 4]
    assert ns["geometry"].records[-1]["measures"]["lambda_max"]["attention"] == ATTENTION_NOTE


# -- Lightning ---------------------------------------------------------------------------------------------------
class Classifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def fit_lightning(callbacks):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    lightning.seed_everything(0, verbose=False)
    module = Classifier()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    trainer = lightning.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader)
    return module, (x, y)


def test_lightning_callback_records_and_leaves_training_unchanged(tmp_path):
    from batchgap.integrations.lightning import GeometryCallback

    plain, data = fit_lightning([])
    cb = GeometryCallback(data, every=2, subset=32, out=tmp_path / "pl.jsonl",
                          measures=["loss", "lambda_max", "trace"], options={"trace": {"n_probes": 4}})
    tracked, _ = fit_lightning([cb])
    for (n, a), (_, b) in zip(plain.state_dict().items(), tracked.state_dict().items()):
        assert torch.equal(a, b), n
    records = read_records(tmp_path / "pl.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6] and records == cb.records
    assert all(r["measurement_set"]["rows"] == 32 and r["measures"]["loss"]["n"] == 32 for r in records)


def test_the_lightning_example_in_docs_track_md_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(doc_block("lightning"), "docs/track.md", "exec"), {"__name__": "docs_track"})
    records = read_records(tmp_path / "lightning.jsonl")
    assert [r["step"] for r in records] == [4, 8] and records[0]["measures"]["lambda_max"]["value"] > 0


def test_nothing_else_in_batchgap_imports_the_integrations():
    src = ROOT / "src" / "batchgap"
    users = [p for p in src.rglob("*.py") if "integrations" not in p.parts
             and re.search(r"integrations", p.read_text(encoding="utf8").split('"""', 2)[-1])]
    assert users == []
