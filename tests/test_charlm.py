"""The char-lm study (issue 25): its generated corpus, its tiny GPT through the causal-LM objective, end to end."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch

from batchgap import charlm
from batchgap.cli import main
from batchgap.landscape.objective import huggingface_objective


def _sha(d: dict) -> str:
    h = hashlib.sha256()
    for split in ("train", "test"):
        for k, v in d[split].items():
            h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


def test_the_corpus_is_deterministic_across_processes_and_its_splits_differ():
    here = _sha(charlm.load(n_train=64, n_test=16))
    code = ("import hashlib; from batchgap import charlm\n"
            "d = charlm.load(n_train=64, n_test=16); h = hashlib.sha256()\n"
            "for s in ('train', 'test'):\n    for k, v in d[s].items(): h.update(k.encode() + v.numpy().tobytes())\n"
            "print(h.hexdigest())")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there
    d = charlm.load(n_train=64, n_test=16)
    assert d["train"]["input_ids"].shape == (64, 65) and d["test"]["input_ids"].shape == (16, 65)
    assert torch.equal(d["train"]["input_ids"], d["train"]["labels"])
    assert not torch.equal(d["train"]["input_ids"][:16], d["test"]["input_ids"])  # other sentence streams
    assert charlm.load(seed=1)["train"]["input_ids"].ne(charlm.load()["train"]["input_ids"]).any()


def test_the_corpus_is_the_grammars_text():
    """Every word is in the lexicon, every sentence ends with a full stop, and the verb agrees with the subject
    (a sentence whose subject noun is plural has a plural verb right after its subject phrase when it is short)."""
    import random

    rng = random.Random(5)
    words = {w for ws in charlm.LEXICON.values() for w in ws} | {"that"}
    singular = set(charlm.LEXICON["verb_s"] + charlm.LEXICON["iverb_s"])
    plural = set(charlm.LEXICON["verb_p"] + charlm.LEXICON["iverb_p"])
    for _ in range(300):
        s = charlm.sentence(rng)
        assert s.endswith(".") and set(s[:-1].split()) <= words
        toks = s[:-1].split()
        # det [adj [adj]] noun verb ...: the first verb after the first noun agrees with it
        first_noun = next(i for i, w in enumerate(toks) if w in charlm.LEXICON["noun_s"] + charlm.LEXICON["noun_p"])
        if toks[first_noun + 1] in singular | plural:
            assert (toks[first_noun] in charlm.LEXICON["noun_p"]) == (toks[first_noun + 1] in plural), s
    assert charlm.decode(charlm.encode("the cat sees a dog.")) == "the cat sees a dog."


def _by_hand(model: charlm.TinyGPT, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits written out: explicit causal attention (masked softmax), no fused kernel."""
    def ln(m, h):
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias

    b, t = ids.shape
    h = model.tok.weight[ids] + model.pos.weight[:t]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    for blk in model.blocks:
        w = h.shape[-1]
        qkv = ln(blk.ln1, h) @ blk.qkv.weight.T + blk.qkv.bias
        q, k, v = (z.reshape(b, t, blk.heads, w // blk.heads).transpose(1, 2) for z in qkv.split(w, -1))
        scores = (q @ k.transpose(-1, -2)) / (w // blk.heads) ** 0.5
        att = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        h = h + att.transpose(1, 2).reshape(b, t, w) @ blk.proj.weight.T + blk.proj.bias
        u = ln(blk.ln2, h) @ blk.fc.weight.T + blk.fc.bias
        h = h + torch.nn.functional.gelu(u) @ blk.out.weight.T + blk.out.bias
    return ln(model.ln, h) @ model.head.weight.T + model.head.bias


def test_the_models_token_loss_through_the_objective_equals_a_hand_computation():
    torch.manual_seed(0)
    model = charlm.tiny_gpt((6,), 28, width=8, layers=2, heads=2).double()
    ids = torch.tensor([[1, 5, 9, 0, 3, 27], [20, 20, 4, 8, 1, 2]])
    labels = ids.clone()
    labels[1, 4:] = -100  # padding: the second window scores only its first 3 next tokens
    out = huggingface_objective(causal_lm=True)(model, {"input_ids": ids, "labels": labels})
    logits = _by_hand(model, ids)
    terms = [-logits[r, t].log_softmax(-1)[ids[r, t + 1]] for r in range(2) for t in range(5)
             if labels[r, t + 1] != -100]
    assert out.weight == len(terms) == 8
    assert out.mean.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-12)
    # causal: changing the last token changes no earlier position's logits
    other = ids.clone()
    other[:, -1] = 7
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids)[:, :-1], model(input_ids=other)[:, :-1], rtol=0, atol=1e-12)


SMALL = [a for s in ("seeds=[0]", "measure.curve_directions=0", "measure.surface_points=0",
                     "measure.density_vectors=0", "measure.pac_bayes_delta=0", "measure.adaptive_rho=0",
                     "data.train_subset=64", "measure.geometry_examples=4", "measure.noise_scale_batches=1",
                     "measure.sharpness_eps=[0.001]") for a in ("--set", s)]


def test_char_lm_quick_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert main(["run", "char-lm", "--quick", "--out", str(out), "--jobs", "1", *SMALL]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["regime"] for r in doc["runs"]] == ["SB", "LB"] and len(doc["pairs"]) == 1
    assert doc["user"]["model"]["spec"] == "batchgap.charlm:tiny_gpt"
    sb = doc["runs"][0]
    assert sb["eval_protocol"]["unit"] == "token" and sb["train"]["n"] == 64 * 64
    assert sb["geometry"]["sharpness"][0]["unit"] == "token"
    assert sb["geometry"]["noise_scale"]["n"] == 4 * 64
    report = (out / "report.md").read_text()
    assert "**Fit:** the units are tokens" in report and "Not fitted" not in report  # no 99% bar for tokens
    # B_simple counts tokens: LB's batch (10% of 64 windows = 6) is compared with it in tokens, 6 x 64
    assert "B_simple ≈" in report and "LB's batch of 6 rows (384 tokens) is" in report
