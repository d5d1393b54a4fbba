"""`hqclip annotate run / import-seed / teach` through click, on a small store."""

from __future__ import annotations

import json

from click.testing import CliRunner
from test_annotate_support import build_random_llava, make_store

from cycle.cli import main


def test_annotate_commands(tmp_path):
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(main, ["annotate", "import-seed", str(tmp_path), "--run", str(run)])
    assert res.exit_code == 2 and "no samples" in res.output

    store = make_store(run / "lance", n_train=5, n_val=2)
    model = build_random_llava(tmp_path / "llava")
    res = runner.invoke(
        main,
        [
            "annotate",
            "run",
            str(model),
            "--run",
            str(run),
            "--gen",
            "1",
            "--no-progress",
            "annotate.max_new_tokens=8",
            "annotate.retries=0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert 'by_status: {"failed": 5}' in res.output
    assert json.loads((run / "gen-001" / "annotate" / "stats.json").read_text())["rows"] == 5
    assert store.count("annotations") == 5

    res = runner.invoke(main, ["annotate", "run", str(model), "--run", str(run), "--gen", "1", "annotate.batch_size=0"])
    assert res.exit_code == 2 and "annotate.batch_size" in res.output and "Traceback" not in res.output

    rec = {
        "desc": ["the image shows a cup."],
        "neg_desc": ["the image shows a bowl."],
        "tags": ["cup"],
        "neg_tags": ["bowl"],
    }
    (tmp_path / "seed.jsonl").write_text(json.dumps({"uid": "s00001", **rec}) + "\n")
    res = runner.invoke(
        main, ["annotate", "import-seed", str(tmp_path / "seed.jsonl"), "--run", str(run), "--no-progress"]
    )
    assert res.exit_code == 0 and json.loads(res.output)["imported"] == 1
    res = runner.invoke(main, ["annotate", "teach", "--run", str(run)])
    assert res.exit_code == 2 and "exactly one of --ids" in res.output
