"""data_prep.jigsaws: meta-file parsing, layout, capture choice, masks, end to end."""
import os

import cv2
import pytest

from data_prep.common import PrepError
from data_prep.jigsaws import jigsaws_samples, read_meta_file
from data_prep.prepare import prepare_jigsaws
from prep_testutil import (StandInExtractor, dataset_contents, make_jigsaws, write_png_masks,
                           write_video)

META = ("Suturing_B001\t\tN\t\t13\t\t2\t\t2\t\t2\t\t2\t\t2\t\t3\n"
        "\n"
        "Suturing_E005\t\tE\t\t28\t\t5\t\t5\t\t4\t\t5\t\t5\t\t4\n")


def test_meta_file_with_empty_tab_columns(tmp_path):
    p = tmp_path / "meta_file_Suturing.txt"
    p.write_text(META)
    rows = read_meta_file(str(p), "Suturing")
    assert [(r["name"], r["user"], r["trial"], r["skill"], r["grs"]) for r in rows] == [
        ("Suturing_B001", "B", 1, "N", 13.0), ("Suturing_E005", "E", 5, "E", 28.0)]
    assert rows[1]["items"] == (5.0, 5.0, 4.0, 5.0, 5.0, 4.0) and rows[1]["line"] == 3


@pytest.mark.parametrize("line,pattern", [
    ("Suturing_C001\t\tN\t\t13\t\t2\t\t2\t\t2\n", r"line 4: 6 fields, expected 9"),
    ("Suturing_C001\t\tN\t\tx\t\t2\t\t2\t\t2\t\t2\t\t2\t\t3\n", r"line 4: non-numeric"),
    ("Suturing_C001\t\tN\t\t31\t\t5\t\t5\t\t5\t\t5\t\t5\t\t6\n", r"line 4: GRS 31 outside"),
    ("Knot_Tying_C001\t\tN\t\t13\t\t2\t\t2\t\t2\t\t2\t\t2\t\t3\n", r"line 4: name 'Knot_Tying_C001'"),
    ("Suturing_B001\t\tN\t\t13\t\t2\t\t2\t\t2\t\t2\t\t2\t\t3\n", r"line 4: Suturing_B001 already"),
])
def test_meta_file_problems_have_line_numbers(tmp_path, line, pattern):
    p = tmp_path / "meta_file_Suturing.txt"
    p.write_text(META + line)
    with pytest.raises(PrepError, match=pattern):
        read_meta_file(str(p), "Suturing")


def test_layout_capture_and_missing_things(tmp_path):
    root = make_jigsaws(tmp_path, "Needle_Passing", trials=(("B", 1, 40), ("H", 4, 40)),
                        captures=(1, 2))
    # a video without a meta entry is skipped with a warning
    write_video(tmp_path / "Needle_Passing/video/Needle_Passing_I002_capture2.avi", 5)
    specs = jigsaws_samples(root, "Needle_Passing", capture=2, modalities=("rgb", "flow"))
    assert [(s.video_id, s.surgeon_id, s.supertrial, s.task) for s in specs] == [
        ("Needle_Passing_B001", "B", 1, "Needle_Passing"), ("Needle_Passing_H004", "H", 4,
                                                            "Needle_Passing")]
    assert specs[0].video_path.endswith("video/Needle_Passing_B001_capture2.avi")
    assert specs[0].source_video == "Needle_Passing_B001" and len(specs[0].item_scores) == 6
    with pytest.raises(PrepError, match=r"no masks found for 2 JIGSAWS trial\(s\).*--mask_root"):
        jigsaws_samples(root, "Needle_Passing", modalities=("rgb", "flow", "mask"))
    with pytest.raises(PrepError, match="meta file .* does not exist"):
        jigsaws_samples(root, "Suturing", modalities=("rgb",))
    with pytest.raises(PrepError, match="capture 1 or 2"):
        jigsaws_samples(root, "Needle_Passing", capture=3)


def _direct_segments(path):
    cap = cv2.VideoCapture(path)
    n = 0
    while cap.grab():
        n += 1
    return len(range(0, n, 3)) // 32


def test_end_to_end_jigsaws_layout(tmp_path):
    root = make_jigsaws(tmp_path / "J", trials=(("B", 1, 300), ("C", 2, 405), ("D", 3, 450),
                                                ("E", 1, 300)), captures=(1,))
    mroot = tmp_path / "J/Suturing/masks"
    write_png_masks(mroot / "Suturing_B001_capture1", 300, seed=0)
    write_video(str(mroot / "Suturing_C002.avi"), 405, seed=1, mask=True)
    write_png_masks(mroot / "Suturing_D003", 450, seed=2, step=3)          # 10-FPS PNGs
    write_png_masks(mroot / "Suturing_E001", 300, seed=3)
    os.remove(tmp_path / "J/Suturing/video/Suturing_E001_capture1.avi")     # fails, others go on
    ext = StandInExtractor(image_size=32, batch_size=2)
    res = prepare_jigsaws(root, "Suturing", str(tmp_path / "data"), extractor=ext,
                          image_size=32, batch_size=2, progress=True)   # bars on stderr
    assert res.name == "jigsaws_suturing" and not res.ok
    assert [(f.video_id, os.path.basename(f.file)) for f in res.failures] == [
        ("Suturing_E001", "Suturing_E001_capture1.avi")]
    assert "does not exist" in res.failures[0].reason
    meta, samples = dataset_contents(tmp_path / "data", "jigsaws_suturing")
    assert sorted(samples) == ["Suturing_B001", "Suturing_C002", "Suturing_D003"]
    assert meta["source"] == "jigsaws" and meta["failed"] == ["Suturing_E001"]
    assert (meta["score_min"], meta["score_max"], meta["image_size"]) == (6.0, 30.0, 32)
    assert meta["modalities"] == ["rgb", "flow", "mask"] and meta["flow_bound"] == 20.0
    s = samples["Suturing_C002"]
    assert (s["surgeon_id"], s["supertrial"], s["task"], s["source_video"]) == (
        "C", 2, "Suturing", "Suturing_C002")
    assert s["item_scores"].shape == (6,) and s["score"] == pytest.approx(s["item_scores"].sum())
    for vid, smp in samples.items():
        want = _direct_segments(os.path.join(root, "Suturing/video", f"{vid}_capture1.avi"))
        assert smp["num_segments"] == want and smp["rgb"].shape == (want, 1024)
        assert smp["flow"].shape == smp["mask"].shape == (want, 1024)
    assert all(x[0] <= 2 for x in ext.inputs["rgb"])    # chunks never exceed batch_size segments
    assert "Suturing_E001" in res.summary() and "frames/s" in res.summary()
