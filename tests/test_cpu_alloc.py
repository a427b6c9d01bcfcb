"""Transparent huge pages for the memory a decode step streams (remix.kernels.cpu_alloc)."""

import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from remix.kernels import cpu_alloc
from remix.kernels.cpu_alloc import HUGE_PAGE, empty_huge, huge_pages_available, move_to_huge_pages


def huge_kb_at(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    found, kb = False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                found = int(m.group(1), 16) <= address < int(m.group(2), 16)
            elif found and line.startswith("AnonHugePages:"):
                kb = int(line.split()[1])
    return kb


def _in_fresh_process(check) -> None:
    """Run ``check`` (a function of this module) in a new interpreter. Whether a block faults in huge pages hangs on the
    process's heap history: a block under glibc's mmap threshold reuses heap pages that earlier tests touched (4 KiB
    pages, which stay so), and in some orders of the suite (tests/test_prefix.py and tests/test_bench.py first) the
    blocks below came back with no huge page or with pages already in place."""
    out = subprocess.run([sys.executable, "-c", f"import tests.test_cpu_alloc as m; m.{check.__name__}()"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def test_empty_huge_is_an_aligned_contiguous_tensor_on_huge_pages():
    _in_fresh_process(_check_empty_huge)


def _check_empty_huge():
    t = empty_huge((3, 5, 1000, 64), torch.bfloat16)  # 1.9 MB: under one huge page, a plain tensor
    assert t.shape == (3, 5, 1000, 64) and t.dtype == torch.bfloat16 and t.is_contiguous()
    big = empty_huge((4, 8, 1024, 64), torch.float32).zero_()  # 8 MiB, touched
    assert big.shape == (4, 8, 1024, 64) and big.dtype == torch.float32 and big.is_contiguous()
    assert big.sum().item() == 0.0
    if huge_pages_available():
        assert big.data_ptr() % HUGE_PAGE == 0
        # the kernel backed the advised block with 2 MiB pages at its first touch (4 of them here)
        assert huge_kb_at(big.data_ptr()) >= 2048


def test_huge_page_share_is_the_advised_blocks_share_on_huge_pages():
    """huge_page_shares: what the kernel backed with 2 MiB pages, over the whole huge pages a storage holds - the
    mappings' AnonHugePages (/proc/self/smaps), as huge_kb_at reads them; None for a storage under one huge page.
    (40 MiB: above glibc's largest mmap threshold, so the block is a mapping of its own.)"""
    _in_fresh_process(_check_huge_page_shares)


def _check_huge_page_shares():
    share_of = lambda t: cpu_alloc.huge_page_shares(t)[0]  # noqa: E731
    assert share_of(torch.zeros(1000)) is None
    size = 40 << 20
    big = empty_huge((size,), torch.uint8)
    if huge_pages_available():
        assert share_of(big) == 0.0  # advised, not touched yet: nothing backs it
    big.zero_()
    share = share_of(big)
    assert share is not None and 0.0 <= share <= 1.0
    if huge_pages_available():  # its own mapping (the advised range): the share is that mapping's AnonHugePages
        # (over the storage's whole huge pages: the block's, and one more where the raw allocation fell aligned)
        assert abs(share - min(1.0, huge_kb_at(big.data_ptr()) * 1024 / size)) <= HUGE_PAGE / size and share > 0
    assert cpu_alloc.huge_page_shares(big, torch.zeros(1000), big) == [share, None, share]  # several, one read


def test_move_to_huge_pages_keeps_every_tensor_its_values_and_sharing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 576), nn.Linear(576, 1536), nn.Linear(1536, 576), nn.Linear(576, 1000))
    model[3].weight = model[0].weight  # tied, as an LM head and its embeddings
    model.requires_grad_(False)
    view = model[1].weight[10:20]  # a view held elsewhere (as the engine's fused q/k/v weight is)
    params = list(model.parameters())
    before = [p.clone() for p in params]
    ids = torch.tensor([[1, 5, 999]])
    expected = model(ids)
    moved = move_to_huge_pages([*params, view])
    if not huge_pages_available():
        assert moved == 0
        return
    # 576000 + 884736 + 1536 + 884736 + 576 + 1000 floats, each storage on a 64-byte boundary
    assert moved == sum(-(-p.numel() * 4 // 64) * 64 for p in params)
    assert all(p is q for p, q in zip(params, model.parameters()))  # the same Parameter objects
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    storages = {p.untyped_storage().data_ptr() for p in params}
    assert len(storages) == 1 and view.untyped_storage().data_ptr() in storages  # one block, the view in it
    assert torch.equal(view, model[1].weight[10:20]) and view.data_ptr() == model[1].weight[10].data_ptr()
    assert model[3].weight is model[0].weight
    assert torch.equal(model(ids), expected)
    assert huge_kb_at(params[0].data_ptr()) >= 2048


def test_huge_pages_switch_off_and_small_blocks_stay_plain(monkeypatch):
    monkeypatch.setenv("REMIX_HUGE_PAGES", "0")
    assert not huge_pages_available()
    layer = nn.Linear(1536, 1536).requires_grad_(False)  # 9 MB
    ptr = layer.weight.data_ptr()
    assert move_to_huge_pages(list(layer.parameters())) == 0 and layer.weight.data_ptr() == ptr
    assert empty_huge((1024, 1024), torch.float32).shape == (1024, 1024)
    monkeypatch.setenv("REMIX_HUGE_PAGES", "1")
    small = nn.Linear(64, 64).requires_grad_(False)
    ptr = small.weight.data_ptr()
    assert move_to_huge_pages(list(small.parameters())) == 0 and small.weight.data_ptr() == ptr  # under one page


def test_without_a_thp_policy_nothing_is_asked(monkeypatch, tmp_path):
    policy = tmp_path / "enabled"
    policy.write_text("always madvise [never]\n")
    monkeypatch.setattr(cpu_alloc, "_THP_POLICY", str(policy))
    assert not huge_pages_available()
    policy.write_text("always [madvise] never\n")
    assert huge_pages_available() == (cpu_alloc._libc() is not None)
    monkeypatch.setattr(cpu_alloc, "_THP_POLICY", str(tmp_path / "missing"))
    assert not huge_pages_available()


def test_the_thp_policy_in_words(monkeypatch, tmp_path):
    """What the engine's start-up warning says when the weights or the KV cache did not get huge pages."""
    policy = tmp_path / "enabled"
    monkeypatch.setattr(cpu_alloc, "_THP_POLICY", str(policy))
    for text, word in (("always madvise [never]\n", "never"), ("always [madvise] never\n", "madvise"),
                       ("[always] madvise never\n", "always")):
        policy.write_text(text)
        assert cpu_alloc.thp_policy() == word
    monkeypatch.setenv("REMIX_HUGE_PAGES", "0")
    assert cpu_alloc.thp_policy() == "off (REMIX_HUGE_PAGES=0)"
    monkeypatch.setenv("REMIX_HUGE_PAGES", "1")
    monkeypatch.setattr(cpu_alloc, "_THP_POLICY", str(tmp_path / "missing"))
    assert cpu_alloc.thp_policy() == "unavailable"
