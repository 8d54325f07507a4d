"""data_prep.manifest: parsing, defaults and up-front rejection with CSV line numbers."""
import os

import pytest

from data_prep.common import PrepError
from data_prep.manifest import read_manifest

HEADER = "video_id,video_path,score,surgeon_id,mask_path"


def _write(tmp_path, text, name="m.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_basic_rows_paths_and_defaults(tmp_path):
    p = _write(tmp_path, HEADER + ",phase,start_s,end_s\n"
               "v1,videos/a.avi,21.5,S1,masks/a,,,\n"
               "v1_p2,/abs/b.mp4,14,S2,/abs/mb.avi,left,10.5,20\n")
    a, b = read_manifest(p)
    assert a.video_path == os.path.join(str(tmp_path), "videos/a.avi")
    assert a.mask_path == os.path.join(str(tmp_path), "masks/a")
    assert a.score == 21.5 and a.surgeon_id == "S1" and a.source_video == "a"
    assert a.start_s is None and a.end_s is None and a.item_scores == ()
    assert b.video_path == "/abs/b.mp4" and b.source_video == "b"
    assert (b.start_s, b.end_s, b.phase) == (10.5, 20.0, "left")
    assert a.origin == "m.csv line 2"


def test_rah_style_raters_phases_and_items(tmp_path):
    p = _write(tmp_path, "video_id,video_path,surgeon_id,rater_1,rater_2,start_s,end_s,phase,"
               "source_video,item_1,item_2\n"
               "r1_p1,r1.mp4,A,20,23,0,100,right,r1,3,4\n"
               "r1_p2,r1.mp4,A,18,,100,250,middle,r1,,\n"
               "r1_p3,r1.mp4,A,25,26,250,300,left,r1,2,2\n")
    specs = read_manifest(p, modalities=("rgb", "flow"))
    assert [s.score for s in specs] == [21.5, 18.0, 25.5]
    assert {s.source_video for s in specs} == {"r1"}
    assert specs[0].item_scores == (3.0, 4.0) and specs[1].item_scores == ()
    assert specs[1].mask_path is None


def test_score_must_agree_with_raters(tmp_path):
    p = _write(tmp_path, "video_id,video_path,score,surgeon_id,rater_1,rater_2\n"
               "a,a.avi,21.5,S,20,23\nb,b.avi,22,S,20,23\n")
    with pytest.raises(PrepError, match=r"line 3, column 'score': 22 differs from the mean"):
        read_manifest(p, modalities=("rgb",))


@pytest.mark.parametrize("body,pattern", [
    ("video_id,video_path,surgeon_id,mask_path\na,a.avi,S,m\n",
     r"line 1: missing column\(s\) \['score'\]"),
    ("video_id,video_path,score,surgeon_id\na,a.avi,20,S\n",
     r"line 1: missing column\(s\) \['mask_path'\].*--modalities=rgb,flow"),
    (HEADER + "\na,a.avi,20,S,m\nb,b.avi,20,S,m\na,c.avi,20,S,m\n",
     r"line 4, column 'video_id': 'a' already used on line 2"),
    (HEADER + "\na,a.avi,twenty,S,m\n", r"line 2, column 'score': 'twenty' is not a number"),
    (HEADER + "\na,a.avi,nan,S,m\n", r"line 2, column 'score': 'nan' is not a number"),
    (HEADER + "\na,a.avi,20,S,m\nb,b.avi,31,S,m\n",
     r"line 3, column 'score': 31 is outside the score scale \(scale 6-30"),
    (HEADER + "\na,a.avi,20,S,m\nb,b.avi,5,S,m\n", r"line 3, column 'score': 5 is outside"),
    (HEADER + "\na,a.avi,,S,m\n", r"line 2, column 'score': empty"),
    (HEADER + "\na,,20,S,m\n", r"line 2, column 'video_path': empty"),
    (HEADER + "\na,a.avi,20,,m\n", r"line 2, column 'surgeon_id': empty"),
    (HEADER + "\na,a.avi,20,S,\n", r"line 2, column 'mask_path': empty.*--modalities=rgb,flow"),
    (HEADER + ",start_s,end_s\na,a.avi,20,S,m,5,2\n", r"line 2, column 'end_s': 2 is not after"),
    (HEADER + ",start_s\na,a.avi,20,S,m,soon\n", r"line 2, column 'start_s'"),
    (HEADER + "\na,a.avi,20,S,m,extra\n", r"line 2: 6 fields but the header has 5"),
    (HEADER + ",rater_1\na,a.avi,,S,m,x\n", r"line 2, column 'rater_1': 'x' is not a number"),
    (HEADER + ",rater_1\na,a.avi,,S,m,40\n", r"line 2, column 'rater_1': 40 is outside"),
    ("", r"is empty"),
    (HEADER + "\n", r"has no rows"),
])
def test_rejections_name_line_column_and_fix(tmp_path, body, pattern):
    p = _write(tmp_path, body)
    with pytest.raises(PrepError, match=pattern) as e:
        read_manifest(p, score_min=6, score_max=30)
    assert "m.csv" in str(e.value)


def test_all_problems_reported_together(tmp_path):
    p = _write(tmp_path, HEADER + "\na,a.avi,x,S,m\nb,b.avi,40,S,m\na,c.avi,20,S,m\n")
    with pytest.raises(PrepError) as e:
        read_manifest(p, score_min=6, score_max=30)
    msg = str(e.value)
    assert "3 problem(s)" in msg and "line 2" in msg and "line 3" in msg and "line 4" in msg


def test_missing_manifest_and_comment_lines(tmp_path):
    with pytest.raises(PrepError, match="does not exist"):
        read_manifest(str(tmp_path / "none.csv"))
    p = _write(tmp_path, HEADER.upper() + "\n# a comment,,,,\n\na,a.avi,20,S,m\n")
    (spec,) = read_manifest(p)
    assert spec.video_id == "a" and spec.origin == "m.csv line 4"
