"""WikiText / Transformer-XL (Table 7): the official file format and vocabulary, ordered segments,
memory, perplexity against a direct computation, and a short training run on the fixture."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_cfg
from projbench.data.wikitext import EOS, FILES, HF_SPLITS, UNK, OrderedSegments, load_corpus
from projbench.distributed import DistInfo
from projbench.errors import DataError
from projbench.models.transformer_xl import TransformerXL
from projbench.tasks.wikitext import WikiTextTask
from projbench.train import train

TINY_MODEL = dict(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64)
TINY = ["task=wikitext", "logger=none", "trainer.progress=false", "task.data.fixture=true",
        *(f"task.model.{k}={v}" for k, v in TINY_MODEL.items()), "task.model.adaptive_cutoffs=null",
        "task.data.batch_size=4", "task.data.tgt_len=16", "task.model.mem_len=16", "task.model.eval_mem_len=16",
        "task.data.eval_tgt_len=16", "task.data.eval_batch_size=2"]



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
def test_perplexity_matches_a_direct_computation_and_memory_matches_full_context(data_dir):
    task = make_task(data_dir, "task.model.dropout=0.0", "task.model.init_std=0.3")  # larger: context matters
    torch.manual_seed(0)
    model = task.build_model().eval()
    tokens = task.corpus.splits["val"]
    stream_len = tokens.numel() // 2

    def ppl(tgt_len: int, mem_len: int) -> float:
        task.cfg.model.eval_mem_len = mem_len
        loader = task._loader(OrderedSegments(tokens, 2, tgt_len))
        with torch.no_grad():
            return task.evaluate(model, loader, torch.device("cpu"))["ppl"]

    # by hand: one segment over each whole stream, no memory, logits of the tied softmax
    data = tokens[:2 * stream_len].long().view(2, stream_len)
    with torch.no_grad():
        hidden, _ = model.transformer(data[:, :-1], None, mem_len=0)
        logits = hidden @ model.word_emb.weight.T + model.out_bias
    targets = data[:, 1:]
    nll = logits.logsumexp(-1) - logits.gather(-1, targets[..., None]).squeeze(-1)
    direct = math.exp(nll.mean().item())
    assert ppl(stream_len, 0) == pytest.approx(direct, rel=1e-5)
    # segments of 16 with memory of the whole past see exactly the full context ...
    assert ppl(16, stream_len) == pytest.approx(direct, rel=1e-4)
    # ... and without memory they see less
    assert ppl(16, 0) != pytest.approx(direct, rel=1e-2)


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


def test_adaptive_softmax_gives_every_parameter_a_gradient():
    torch.manual_seed(0)
    model = TransformerXL(60, adaptive_cutoffs=[10, 30], mem_len=4, **TINY_MODEL)
    inputs = torch.randint(0, 10, (2, 6))  # targets only in the head: the tail clusters are unused
    nll, mems = model(inputs, inputs.roll(-1, 1))
    nll.mean().backward()
    assert nll.shape == (2, 6) and len(mems) == 2 and mems[0].shape == (2, 4, 32)
    assert all(p.grad is not None for p in model.parameters())  # what DDP needs
    model.eval()
    with torch.no_grad():
        hidden, _ = model.transformer(inputs)
        logp = model.crit.log_prob(hidden.reshape(-1, 32)).view(2, 6, 60)
        expected = -logp.gather(-1, inputs.roll(-1, 1)[..., None]).squeeze(-1)
        assert torch.allclose(model(inputs, inputs.roll(-1, 1))[0], expected, atol=1e-5)


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
    assert summary["metrics"]["test/ppl"]["final"] < 0.4 * vocab
    assert summary["metrics"]["test/loss"]["final"] == pytest.approx(math.log(summary["metrics"]["test/ppl"]["final"]))
    assert any(p["name"] == "projected_fraction" for p in points)


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
