"""bench/resplit.py: the second long-tailed training set is TMWPL's rows under another prior, drawn the same way
every time, with TMWPL's balanced test split beside it."""

from __future__ import annotations

import json
from collections import Counter


def test_the_resplit_draws_its_class_sizes_from_tmwpl_train_the_same_way_every_time(tmp_path, tmwpl_dir,
                                                                                     monkeypatch):
    from bench import resplit

    monkeypatch.setenv("NCAL_DATA_DIR", str(tmwpl_dir))
    train, test = resplit.write(tmp_path / "a")
    rows = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
    sizes = resplit.class_sizes()
    assert Counter(r["class"] for r in rows) == sizes and list(sizes.values()) == sorted(sizes.values(), reverse=True)
    assert max(sizes.values()) / min(sizes.values()) > 45  # imbalance ~50, against TMWPL's ~30
    source = {json.loads(line)["id"]: json.loads(line)
              for line in (tmwpl_dir / "TMWPL_train.jsonl").read_text(encoding="utf-8").splitlines()}
    assert len({r["id"] for r in rows}) == len(rows) and all(source[r["id"]] == r for r in rows)
    assert test.read_bytes() == (tmwpl_dir / "TMWPL_test.jsonl").read_bytes()
    assert resplit.write(tmp_path / "b")[0].read_bytes() == train.read_bytes()
