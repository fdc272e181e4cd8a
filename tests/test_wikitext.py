"""WikiText / Transformer-XL (Table 7): the official file format and vocabulary, ordered segments,
memory, perplexity against a direct computation and eval.py's protocol against one by hand, the
tied adaptive softmax, weight normalisation under AdamP, exact resume with the memory, DDP, and
the Table 7 sweep on the fixture."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_cfg, read_summary, run_cli
from projbench import tables
from projbench.data.wikitext import EOS, FILES, HF_SPLITS, UNK, Corpus, OrderedSegments, load_corpus
from projbench.distributed import DistInfo
from projbench.errors import ConfigError, DataError
from projbench.models.transformer_xl import Context, TransformerXL
from projbench.optim import build_optimizer
from projbench.tasks.wikitext import EvalProtocol, EvalSegments, WikiTextTask
from projbench.train import train

TINY_MODEL = dict(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64)
TINY = ["task=wikitext", "logger=none", "trainer.progress=false", "task.data.fixture=true",
        *(f"task.model.{k}={v}" for k, v in TINY_MODEL.items()), "task.model.adaptive_cutoffs=null",
        "task.data.batch_size=4", "task.data.tgt_len=16", "task.model.mem_len=16",
        "task.eval.tgt_len=16", "task.eval.mem_len=16", "task.eval.batch_size=2",
        "task.final_eval.tgt_len=8", "task.final_eval.mem_len=40", "task.final_eval.clamp_len=20",
        "task.final_eval.batch_size=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """`paths.data_dir` with the fixture, written by the task's setup as a fixture run writes it."""
    root = tmp_path_factory.mktemp("data")
    make_task(root)
    assert sorted(p.name for p in (root / "fixtures" / "wikitext").iterdir()) == sorted(FILES.values())
    return root


def make_task(data_dir: Path, *overrides: str) -> WikiTextTask:
    cfg = make_cfg(TINY + [f"paths.data_dir={data_dir}", *overrides])
    task = WikiTextTask(cfg.task)
    task.setup(DistInfo())
    return task


# -- data ---------------------------------------------------------------------------------------
def test_fixture_is_in_the_official_format_and_the_vocab_has_eos_and_unk(data_dir, tmp_path):
    root = data_dir / "fixtures" / "wikitext"
    text = (root / FILES["train"]).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    assert lines[0] == " \n" and all(line.startswith(" ") and line.endswith(" \n") for line in lines)
    assert any(re.fullmatch(r" = [^=]+ = \n", line) for line in lines)  # article titles
    assert any(re.fullmatch(r" = = [^=]+ = = \n", line) for line in lines)  # section headings
    assert "<unk>" in text and "@,@" in text and EOS not in text

    corpus = load_corpus(root, cache_dir=tmp_path / "cache")
    vocab, train_ids = corpus.vocab, corpus.splits["train"]
    assert vocab[0] == EOS and UNK in vocab and len(set(vocab)) == len(vocab)
    assert int((train_ids == 0).sum()) == len(lines)  # Transformer-XL: one <eos> per line
    expected = [EOS, *lines[1].split(), EOS, EOS]  # blank line, ` = Title = `, blank line
    assert [vocab[i] for i in train_ids[:len(expected)].tolist()] == expected
    assert 3000 < len(train_ids) < 10000 and all(len(corpus.splits[s]) > 300 for s in ("val", "test"))

    # cached by size/mtime: a second load reads the .pt, an edited file makes a new entry
    cached = list((tmp_path / "cache").glob("wikitext-*.pt"))
    assert len(cached) == 1
    again = load_corpus(root, cache_dir=tmp_path / "cache")
    assert again.vocab == vocab and torch.equal(again.splits["test"], corpus.splits["test"])
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    with open(copy / FILES["test"], "a", encoding="utf-8") as f:
        f.write(" the cat sees the dog . \n")
    edited = load_corpus(copy, cache_dir=tmp_path / "cache")
    assert len(edited.splits["test"]) == len(corpus.splits["test"]) + 7
    assert len(list((tmp_path / "cache").glob("wikitext-*.pt"))) == 2


def test_missing_file_is_a_data_error_naming_it(data_dir, tmp_path):
    root = Path(shutil.copytree(data_dir / "fixtures" / "wikitext", tmp_path / "wikitext-103"))
    (root / FILES["val"]).unlink()
    with pytest.raises(DataError, match=re.escape(str(root / "wiki.valid.tokens"))):
        load_corpus(root)
    overrides = [o for o in TINY if not o.startswith("task.data.fixture")]
    cfg = make_cfg(overrides + [f"task.data.root={root}", f"paths.data_dir={tmp_path}"])
    with pytest.raises(DataError, match="wiki.valid.tokens.*missing.*task.data.root"):
        train(cfg, tmp_path / "run")  # from setup, before any training; __main__ prints it and exits 2


def test_ordered_segments_are_contiguous_streams_and_ranks_share_them():
    tokens = torch.arange(1003, dtype=torch.int32)
    seg = OrderedSegments(tokens, n_streams=4, tgt_len=16)
    n_step = 1003 // 4  # 250 tokens a stream, the 3 left over dropped
    assert len(seg) == math.ceil((n_step - 1) / 16)
    batches = [seg[k] for k in range(len(seg))]
    assert [b["segment"] for b in batches] == list(range(len(seg)))
    assert all(b["inputs"].shape == (4, 16) for b in batches[:-1]) and batches[-1]["inputs"].shape == (4, (n_step - 1) % 16)
    for b in batches:
        assert b["inputs"].dtype == torch.long and torch.equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    for k in range(len(seg) - 1):  # segment k+1 continues segment k in every stream
        assert torch.equal(batches[k + 1]["inputs"][:, 0], batches[k]["targets"][:, -1])
    streams = torch.cat([b["inputs"] for b in batches] + [batches[-1]["targets"][:, -1:]], 1)
    assert torch.equal(streams, tokens[:4 * n_step].long().view(4, n_step))

    # two DDP ranks read the two halves of the same 4 streams
    halves = [OrderedSegments(tokens, 4, 16, DistInfo(rank=r, world_size=2)) for r in (0, 1)]
    assert torch.equal(torch.cat([h[3]["inputs"] for h in halves]), seg[3]["inputs"])


# -- model and metric ---------------------------------------------------------------------------
def _ppl(task: WikiTextTask, model, tokens: torch.Tensor, protocol: EvalProtocol) -> float:
    with torch.no_grad():
        return task.evaluate(model, task._loader(EvalSegments(tokens, protocol)), torch.device("cpu"))["ppl"]


def test_perplexity_matches_a_direct_computation_and_memory_matches_full_context(data_dir):
    task = make_task(data_dir, "task.model.dropout=0.0", "task.model.init_std=0.3")  # larger: context matters
    torch.manual_seed(0)
    model = task.build_model().eval()
    tokens = task.corpus.splits["val"]
    stream_len = tokens.numel() // 2

    # by hand: one segment over each whole stream, no memory, logits of the tied softmax
    data = tokens[:2 * stream_len].long().view(2, stream_len)
    with torch.no_grad():
        hidden, _ = model.transformer(data[:, :-1], None, Context(mem_len=0))
        logits = hidden @ model.word_emb.weight.T + model.crit.bias
    targets = data[:, 1:]
    nll = logits.logsumexp(-1) - logits.gather(-1, targets[..., None]).squeeze(-1)
    direct = math.exp(nll.mean().item())
    assert _ppl(task, model, tokens, EvalProtocol(2, stream_len, Context(0))) == pytest.approx(direct, rel=1e-5)
    # segments of 16 with memory of the whole past see exactly the full context ...
    assert _ppl(task, model, tokens, EvalProtocol(2, 16, Context(stream_len))) == pytest.approx(direct, rel=1e-4)
    # ... and without memory they see less
    assert _ppl(task, model, tokens, EvalProtocol(2, 16, Context(0))) != pytest.approx(direct, rel=1e-2)


def _sinusoid(distances: torch.Tensor, d_model: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d_model, 2.0) / d_model)
    angles = distances.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], -1)


def _ppl_by_hand(model, tokens: torch.Tensor, n_streams: int, tgt_len: int, mem_len: int, clamp_len: int,
                 same_length: bool) -> float:
    """eval.py's perplexity, one position at a time: position q of a stream, in the segment that
    starts at s = q - q % tgt_len, sees at every layer the layer inputs of positions lo..q, where
    lo = s - min(s, mem_len) (the memory holds up to mem_len positions before the segment) and,
    with same_length, lo >= q - mem_len + 1 (mem_len positions, itself included); relative
    distances are clamped to clamp_len."""
    length = tokens.numel() // n_streams
    streams = tokens[:n_streams * length].long().view(n_streams, length)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for stream in streams:
            x, y = stream[:-1], stream[1:]
            h = model.word_emb(x) * model.d_model ** 0.5  # the first layer's inputs, (n, d)
            for layer in model.layers:
                out = []
                for q in range(len(x)):
                    start = q - q % tgt_len
                    lo = start - min(start, mem_len)
                    if same_length:
                        lo = max(lo, q - mem_len + 1)
                    distances = torch.arange(q - lo, -1, -1)
                    if clamp_len > 0:
                        distances = distances.clamp(max=clamp_len)
                    mask = torch.zeros(1, q - lo + 1, dtype=torch.bool)
                    out.append(layer(h[None, q:q + 1], _sinusoid(distances, model.d_model), model.r_w_bias,
                                     model.r_r_bias, mask, h[None, lo:q])[0])
                h = torch.cat(out)
            logits = h @ model.word_emb.weight.T + model.crit.bias
            nll_sum += float((logits.logsumexp(-1) - logits.gather(-1, y[:, None]).squeeze(-1)).sum())
            count += len(y)
    return math.exp(nll_sum / count)


def test_final_evaluation_is_eval_py_protocol_by_hand(data_dir):
    """Segments of 8, memory of 20 (not a multiple of 8: it fills mid-segment), clamp 5,
    same-length attention: task.final_eval's loaders and task.evaluate against the definition."""
    task = make_task(data_dir, "task.model.dropout=0.0", "task.model.init_std=0.3", "task.final_eval.tgt_len=8",
                     "task.final_eval.mem_len=20", "task.final_eval.clamp_len=5", "task.final_eval.batch_size=2")
    torch.manual_seed(0)
    model = task.build_model().eval()
    loaders = task.final_eval_loaders(4, DistInfo())
    assert set(loaders) == {"val_final", "test_final"}
    with torch.no_grad():
        ours = task.evaluate(model, loaders["test_final"], torch.device("cpu"))
    tokens = task.corpus.splits["test"]
    by_hand = _ppl_by_hand(model, tokens, 2, 8, 20, 5, True)
    assert ours["ppl"] == pytest.approx(by_hand, rel=1e-5)
    assert ours["loss"] == pytest.approx(math.log(by_hand), rel=1e-5)
    # each setting matters: without same_length, without the clamp, with the training evaluation
    assert by_hand != pytest.approx(_ppl_by_hand(model, tokens, 2, 8, 20, 5, False), rel=1e-3)
    assert by_hand != pytest.approx(_ppl_by_hand(model, tokens, 2, 8, 20, -1, True), rel=1e-3)
    with torch.no_grad():
        progress = task.evaluate(model, task.eval_loaders(4, DistInfo())["test"], torch.device("cpu"))
    assert progress["ppl"] != pytest.approx(ours["ppl"], rel=1e-3)


def test_eval_protocols_are_checked_before_training(data_dir):
    with pytest.raises(ConfigError, match="task.final_eval: same_length needs a memory"):
        make_task(data_dir, "task.final_eval.mem_len=0")
    with pytest.raises(ConfigError, match="task.model: same_length needs a memory"):
        make_task(data_dir, "task.model.same_length=true", "task.model.mem_len=0", "task.eval.mem_len=16").build_model()
    with pytest.raises(ConfigError, match="task.eval.tgt_len"):
        make_task(data_dir, "task.eval.tgt_len=0")
    with pytest.raises(ConfigError, match=r"task.model: weight_norm: unknown layers \['ff'\]"):
        make_task(data_dir, "task.model.weight_norm.enabled=true", "task.model.weight_norm.layers=[ff]").build_model()


def test_training_memory_is_carried_detached_and_reset_at_each_epoch(data_dir):
    task = make_task(data_dir)
    model = task.build_model().eval()  # no dropout: equal inputs give equal losses
    segments = task.train_loader(4, DistInfo(), 0).dataset
    loss0 = task.training_loss(model, segments[0])
    assert len(task.mems) == TINY_MODEL["n_layer"] and task.mems[0].shape == (4, 16, 32)
    assert not any(m.requires_grad for m in task.mems) and loss0.requires_grad
    loss1 = task.training_loss(model, segments[1])  # sees segment 0 through the memory
    assert torch.equal(task.mems[0], model.transformer(segments[1]["inputs"], None)[1][0])
    assert task.training_loss(model, segments[0]).item() == pytest.approx(loss0.item(), rel=1e-6)  # epoch start: reset
    task.mems = None
    assert abs(task.training_loss(model, segments[1]).item() - loss1.item()) > 1e-6  # no memory: another loss


def test_memory_state_is_global_and_each_rank_takes_its_block(data_dir):
    task = make_task(data_dir)
    task.mems = [torch.arange(4 * 3 * 2.0).view(4, 3, 2), torch.ones(4, 3, 2)]
    state = task.state_dict()  # one process: no gathering
    assert [m.shape for m in state["mems"]] == [(4, 3, 2)] * 2
    halves = []
    for rank in (0, 1):
        other = make_task(data_dir)
        other.dist = DistInfo(rank=rank, world_size=2)
        other.load_state_dict(state)
        halves.append(other.mems[0])
    assert torch.equal(halves[0], state["mems"][0][:2]) and torch.equal(halves[1], state["mems"][0][2:])
    task.mems = None
    assert task.state_dict() == {"mems": None}


# -- adaptive softmax ---------------------------------------------------------------------------
def test_tied_adaptive_softmax_is_a_distribution_over_the_vocabulary_and_shares_the_embedding():
    torch.manual_seed(0)
    model = TransformerXL(60, adaptive_cutoffs=[10, 30], mem_len=4, init_std=0.5, **TINY_MODEL)
    crit = model.crit
    assert crit.weight is model.word_emb.weight  # tied: one matrix
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in model.named_parameters() if n != "crit.weight")
    inputs = torch.randint(0, 10, (2, 6))  # targets only in the head: the tail clusters are unused
    nll, mems = model(inputs, inputs.roll(-1, 1))
    nll.mean().backward()
    assert nll.shape == (2, 6) and len(mems) == 2 and mems[0].shape == (2, 4, 32)
    assert all(p.grad is not None for p in model.parameters())  # what DDP needs

    # by hand: head softmax over words 0..9 and the two clusters, each tail its own softmax
    hidden = torch.randn(7, 32)
    w, b = crit.weight.detach(), crit.bias.detach()
    head = torch.cat([hidden @ w[:10].T + b[:10], hidden @ crit.cluster_weight.detach().T + crit.cluster_bias.detach()], 1)
    head_logp = head.log_softmax(-1)
    tails = [(hidden @ w[lo:hi].T + b[lo:hi]).log_softmax(-1) + head_logp[:, 10 + k, None]
             for k, (lo, hi) in enumerate([(10, 30), (30, 60)])]
    logp = torch.cat([head_logp[:, :10], *tails], 1)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(7), atol=1e-5)
    targets = torch.tensor([0, 9, 10, 29, 30, 59, 45])  # head, both ends of both clusters
    with torch.no_grad():
        assert torch.allclose(crit(hidden, targets), -logp.gather(1, targets[:, None]).squeeze(1), atol=1e-5)

    untied = TransformerXL(60, adaptive_cutoffs=[10, 30], tie_weight=False, **TINY_MODEL)
    assert untied.crit.weight is not untied.word_emb.weight
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in model.parameters()) + 60 * 32


def test_the_default_model_is_the_151m_base_model():
    """conf/task/wikitext.yaml's model with WikiText-103's 267,735 words, built on the meta device
    (no memory): the count the README gives."""
    cfg = make_cfg(["task=wikitext"])
    task = WikiTextTask(cfg.task)
    task.corpus = Corpus(vocab=["w"] * 267_735, splits={})
    with torch.device("meta"):
        model = task.build_model()
    assert sum(p.numel() for p in model.parameters()) == 151_107_538
    with torch.device("meta"):  # the README's command: the class's defaults are that model too
        assert sum(p.numel() for p in TransformerXL(267_735).parameters()) == 151_107_538
    assert model.crit.bounds == [0, 20000, 40000, 200000, 267_735] and model.crit.weight is model.word_emb.weight
    cfg.task.model.weight_norm.enabled = True
    with torch.device("meta"):
        model = task.build_model()
    assert sum(p.numel() for p in model.parameters()) == 151_107_538 + 16 * (3 * 410 + 410 + 410 + 2100 + 410)


# -- weight normalisation -----------------------------------------------------------------------
def test_weight_norm_makes_each_row_scale_invariant_and_adamp_projects_it():
    torch.manual_seed(0)
    layer = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(12, 5), dim=0)
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    assert g.shape == (5, 1) and v.shape == (5, 12)
    x, y = torch.randn(16, 12), torch.randn(16, 5)

    def step(optim: str) -> tuple[torch.Tensor, torch.Tensor]:
        opt = build_optimizer(make_cfg([f"optim={optim}", "optim.lr=0.1", "optim.weight_decay=0"]).optim, layer)
        v0 = v.detach().clone()
        opt.zero_grad()
        torch.nn.functional.mse_loss(torch.tanh(layer(x)), y).backward()
        cos = (v.grad * v).sum(1).abs() / (v.grad.norm(dim=1) * v.norm(dim=1))
        opt.step()
        return cos, ((v.detach() - v0) * v0).sum(1) / v0.norm(dim=1) ** 2, opt

    cos, radial, opt = step("adamp")
    assert cos.max() < 1e-5  # the gradient is orthogonal to v, row by row: the channel view's test passes
    record = {id(p): bool(m) for r in opt.last_projection for p, m in zip(r.params, r.projected)}
    assert record[id(v)] and not record[id(g)]
    assert radial.abs().max() < 1e-6  # the projected step leaves every row's norm (to first order)
    _, radial, _ = step("adamw")
    assert radial.abs().max() > 1e-3  # Adam's step is not orthogonal to the rows


def test_weight_norm_goes_on_the_configured_layers_and_keeps_the_function(data_dir):
    torch.manual_seed(0)
    plain = make_task(data_dir).build_model()
    torch.manual_seed(0)
    wn = make_task(data_dir, "task.model.weight_norm.enabled=true", "task.model.weight_norm.layers=[qkv_net,ff_out]").build_model()
    names = [n for n, _ in wn.named_parameters() if "parametrizations" in n]
    assert sorted({n.split(".parametrizations")[0].split(".", 2)[2] for n in names}) == ["attn.qkv_net", "ff.ff_out"]
    assert len(names) == 2 * 2 * TINY_MODEL["n_layer"]  # g and v of 2 layers per block
    segments = make_task(data_dir).train_loader(4, DistInfo(), 0).dataset
    with torch.no_grad():
        a, _ = plain.eval()(segments[0]["inputs"], segments[0]["targets"])
        b, _ = wn.eval()(segments[0]["inputs"], segments[0]["targets"])
    assert torch.allclose(a, b, atol=1e-5)  # g starts at ||v||: the same function at initialisation


# -- training -----------------------------------------------------------------------------------
def test_a_few_dozen_steps_on_the_fixture_lower_validation_perplexity(data_dir, tmp_path):
    cfg = make_cfg(TINY + [f"paths.data_dir={data_dir}", "optim=adamp", "optim.lr=1e-2", "task.model.dropout=0.0",
                           "trainer.max_steps=30", "trainer.eval_every=10", "trainer.log_every=10",
                           "trainer.diagnostics_every=10"])
    summary = train(cfg, tmp_path)
    points = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [p["value"] for p in points if p["split"] == "val" and p["name"] == "ppl"]
    vocab = len(load_corpus(data_dir / "fixtures" / "wikitext").vocab)  # an untrained model is near uniform over it
    assert len(val) == 3 and val[-1] < val[0] and val[-1] < 0.4 * vocab
    metrics = summary["metrics"]
    assert metrics["test/ppl"]["final"] < 0.4 * vocab
    assert metrics["test/loss"]["final"] == pytest.approx(math.log(metrics["test/ppl"]["final"]))
    # the final protocol, once, after the progress evaluation of the last step
    finals = [p for p in points if p["split"].endswith("_final")]
    assert {(p["split"], p["name"], p["step"]) for p in finals} == {
        (s, n, 30) for s in ("val_final", "test_final") for n in ("ppl", "loss")}
    assert metrics["test_final/ppl"]["final"] < 0.4 * vocab
    assert any(p["name"] == "projected_fraction" for p in points)


class _Killed(Exception):
    pass


def test_a_killed_and_resumed_run_continues_with_its_memory(data_dir, tmp_path, monkeypatch):
    args = TINY + [f"paths.data_dir={data_dir}", "optim=adamp", "optim.lr=1e-2", "trainer.max_steps=12",
                   "trainer.ckpt_every=4", "trainer.eval_every=6", "trainer.log_every=2"]
    full = train(make_cfg(args), tmp_path / "full")

    killed = tmp_path / "killed"
    steps = itertools.count(1)
    training_loss = WikiTextTask.training_loss

    def dies_at_step_7(self, model, batch):
        if next(steps) == 7:
            raise _Killed  # after the checkpoint of step 4: steps 5 and 6 are lost, as in a kill
        return training_loss(self, model, batch)

    monkeypatch.setattr(WikiTextTask, "training_loss", dies_at_step_7)
    with pytest.raises(_Killed):
        train(make_cfg(args), killed)
    monkeypatch.undo()
    ckpt = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["task"]["mems"][0].shape == (4, 16, 32)
    forgetful = Path(shutil.copytree(killed, tmp_path / "forgetful"))

    resumed = train(make_cfg(args + ["resume=true"]), killed)
    assert resumed["metrics"] == full["metrics"] and "test_final/ppl" in resumed["metrics"]
    wa = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    wb = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert all(torch.equal(a, b) for a, b in zip(wa["task"]["mems"], wb["task"]["mems"]))

    # the same resume with the memory left out of the checkpoint continues differently
    ckpt["task"] = {}
    torch.save(ckpt, forgetful / "checkpoint.pt")
    other = train(make_cfg(args + ["resume=true"]), forgetful)
    assert other["metrics"]["test_final/ppl"]["final"] != full["metrics"]["test_final/ppl"]["final"]


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="needs torchrun")
def test_ddp_two_ranks_match_one_rank_and_checkpoint_the_global_memory(data_dir, tmp_path):
    args = TINY + [f"paths.data_dir={data_dir}", "optim=adamp", "optim.lr=1e-2", "trainer.max_steps=4", "task.model.dropout=0.0",
                   "trainer.eval_every=4", "task.model.weight_norm.enabled=true"]
    one = tmp_path / "one"
    train(make_cfg(args), one)
    two = tmp_path / "two"
    torchrun = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node=2",
                "--master_port=29531", "-m", "projbench"]
    out = run_cli(args + [f"hydra.run.dir={two}"], tmp_path, runner=torchrun, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = read_summary(one), read_summary(two)
    assert b["world_size"] == 2
    for key in ("test/ppl", "test_final/ppl", "val_final/ppl"):
        assert b["metrics"][key]["final"] == pytest.approx(a["metrics"][key]["final"], rel=1e-4)
    ma = torch.load(one / "checkpoint.pt", weights_only=True)["task"]["mems"]
    mb = torch.load(two / "checkpoint.pt", weights_only=True)["task"]["mems"]
    assert [m.shape for m in mb] == [(4, 16, 32)] * 2  # both ranks' 2 streams, in the global order
    for x, y in zip(ma, mb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_table7_sweep_fills_its_four_cells_beside_the_papers_numbers(data_dir, tmp_path, capsys):
    out = run_cli(["-m", "+experiment=wikitext_table7", *TINY[1:], f"paths.data_dir={data_dir}", "trainer.max_steps=2",
                   "trainer.eval_every=2", f"paths.log_dir={tmp_path}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    sweep = tmp_path / "runs" / "wikitext"  # each cell's run directory
    summaries = [read_summary(d) for d in sorted(sweep.iterdir()) if (d / "summary.json").exists()]
    assert len(summaries) == 4
    capsys.readouterr()
    assert tables.main(["--runs", str(sweep), "--table", "table7", "--format", "csv", "--out", str(tmp_path / "res"),
                        "--no-figures"]) == 0
    cells = {(row["row"], row["column"]): row for row in csv.DictReader(io.StringIO(capsys.readouterr().out))
             if row["record"] == "cell"}
    paper = {("Transformer-XL", "AdamW"): 23.38, ("Transformer-XL", "AdamP"): 23.26,
             ("Transformer-XL + WN", "AdamW"): 23.96, ("Transformer-XL + WN", "AdamP"): 22.77}
    assert set(cells) == set(paper)
    for key, value in paper.items():
        assert float(cells[key]["paper"]) == value and int(cells[key]["n"]) == 1 and float(cells[key]["mean"]) > 1
    assert float(cells[("Transformer-XL + WN", "AdamP")]["paper_delta"]) == pytest.approx(22.77 - 23.96)


def test_a_local_datasets_copy_reads_as_the_token_files(data_dir, tmp_path):
    import datasets

    root = data_dir / "fixtures" / "wikitext"
    lines = {split: (root / name).read_text(encoding="utf-8").splitlines(keepends=True) for split, name in FILES.items()}
    saved = tmp_path / "wikitext-saved"
    datasets.DatasetDict({HF_SPLITS[split]: datasets.Dataset.from_dict({"text": rows}) for split, rows in lines.items()}
                         ).save_to_disk(str(saved))
    from_files, from_hf = load_corpus(root), load_corpus(hf_path=saved, cache_dir=tmp_path / "cache")
    assert from_hf.vocab == from_files.vocab
    assert all(torch.equal(from_hf.splits[s], from_files.splits[s]) for s in FILES)
