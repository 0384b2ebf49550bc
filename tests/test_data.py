"""Data sources and token windows."""

import pytest
import torch

from armquant.data import SOTU_SPLITS, load_texts, token_windows


class CharTokenizer:
    """One token per character: enough to check windowing arithmetic."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        assert not add_special_tokens
        ids = torch.tensor([[ord(ch) % 256 for ch in text]])
        return type("Encoding", (), {"input_ids": ids})()


def test_sotu_splits_are_fixed_and_disjoint(corpus_dir):
    calibration, evaluation = load_texts("sotu:calibration"), load_texts("sotu:evaluation")
    files = sorted((corpus_dir / "sotu").glob("*.txt"))
    years = [int(f.name[:4]) for f in files]
    assert len(calibration) == sum(SOTU_SPLITS["calibration"][0] <= y <= SOTU_SPLITS["calibration"][1] for y in years) == 211
    assert len(evaluation) == 22
    assert not set(calibration) & set(evaluation)
    assert len(load_texts("sotu")) == len(files)
    assert evaluation[0] == files[years.index(2000)].read_text()


def test_file_and_folder_sources(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_texts(str(tmp_path)) == ["first", "second"]
    assert load_texts(str(tmp_path / "a.txt")) == ["first"]


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="unknown corpus split 'test'"):
        load_texts("sotu:test")
    with pytest.raises(FileNotFoundError, match="neither sotu:calibration"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="holds no .txt files"):
        load_texts(str(tmp_path))
    with pytest.raises(ValueError, match="hf:DATASET:CONFIG:SPLIT"):
        load_texts("hf:wikitext")


def test_token_windows_are_non_overlapping_and_drop_the_remainder():
    windows = token_windows(CharTokenizer(), ["abcd", "efgh"], 3)  # "abcd\n\nefgh": 10 tokens
    assert windows.shape == (3, 3)
    assert windows.flatten().tolist() == [ord(c) for c in "abcd\n\nefg"]
    assert token_windows(CharTokenizer(), ["abcdefgh"], 2, max_windows=2).shape == (2, 2)
    with pytest.raises(ValueError, match="fewer than one window of 100"):
        token_windows(CharTokenizer(), ["short"], 100)
    for asked in (0, -1):  # not "too little text", and not a reshape error
        with pytest.raises(ValueError, match=f"max_windows={asked}: ask for at least 1 window"):
            token_windows(CharTokenizer(), ["abcdefgh"], 2, max_windows=asked)

