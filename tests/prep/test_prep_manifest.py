"""data_prep.manifest: parsing, defaults and up-front rejection with CSV line numbers and
video ids; scores must be on the score scale."""
import os
import re
import subprocess
import sys

import pytest

from data_prep.common import PrepError
from data_prep.manifest import read_manifest
from surgfusion_jax.data.feature_dataset import ScoreScaleError, parse_score_scale

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = "video_id,video_path,score,surgeon_id,mask_path"
GEARS = parse_score_scale("gears")


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
    with pytest.raises(PrepError,
                       match=r"line 3 \(video_id 'b'\), column 'score': 22 differs from the mean"):
        read_manifest(p, modalities=("rgb",))


@pytest.mark.parametrize("body,pattern", [
    ("video_id,video_path,surgeon_id,mask_path\na,a.avi,S,m\n",
     r"line 1: missing column\(s\) \['score'\]"),
    ("video_id,video_path,score,surgeon_id\na,a.avi,20,S\n",
     r"line 1: missing column\(s\) \['mask_path'\].*--modalities=rgb,flow"),
    (HEADER + "\na,a.avi,20,S,m\nb,b.avi,20,S,m\na,c.avi,20,S,m\n",
     r"line 4, column 'video_id': 'a' already used on line 2"),
    (HEADER + "\na,a.avi,twenty,S,m\n",
     r"line 2 \(video_id 'a'\), column 'score': 'twenty' is not a finite number"),
    (HEADER + "\na,a.avi,nan,S,m\n",
     r"line 2 \(video_id 'a'\), column 'score': 'nan' is not a finite number"),
    (HEADER + "\na,a.avi,inf,S,m\n", r"line 2 \(video_id 'a'\), column 'score': 'inf' is not"),
    (HEADER + "\na,a.avi,20,S,m\nb,b.avi,31,S,m\n",
     r"line 3 \(video_id 'b'\), column 'score': 31 is outside the score scale gears 6-30; "
     r"fix: .*--score_scale="),
    (HEADER + "\na,a.avi,20,S,m\nb,b.avi,99,S,m\n", r"line 3 \(video_id 'b'\), column 'score': 99 is outside"),
    (HEADER + "\na,a.avi,20,S,m\nb,b.avi,5,S,m\n", r"line 3 \(video_id 'b'\), column 'score': 5 is outside"),
    (HEADER + "\na,a.avi,,S,m\n", r"line 2 \(video_id 'a'\), column 'score': empty"),
    (HEADER + "\na,,20,S,m\n", r"line 2 \(video_id 'a'\), column 'video_path': empty"),
    (HEADER + "\na,a.avi,20,,m\n", r"line 2 \(video_id 'a'\), column 'surgeon_id': empty"),
    (HEADER + "\n,a.avi,20,S,m\n", r"line 2, column 'video_id': empty"),
    (HEADER + "\na,a.avi,20,S,\n", r"line 2 \(video_id 'a'\), column 'mask_path': empty.*--modalities=rgb,flow"),
    (HEADER + ",start_s,end_s\na,a.avi,20,S,m,5,2\n", r"line 2 \(video_id 'a'\), column 'end_s': 2 is not after"),
    (HEADER + ",start_s\na,a.avi,20,S,m,soon\n", r"line 2 \(video_id 'a'\), column 'start_s'"),
    (HEADER + "\na,a.avi,20,S,m,extra\n", r"line 2: 6 fields but the header has 5"),
    (HEADER + ",rater_1\na,a.avi,,S,m,x\n", r"line 2 \(video_id 'a'\), column 'rater_1': 'x' is not a finite number"),
    (HEADER + ",rater_1\na,a.avi,,S,m,nan\n", r"column 'rater_1': 'nan' is not a finite number"),
    (HEADER + ",rater_1\na,a.avi,,S,m,40\n", r"line 2 \(video_id 'a'\), column 'rater_1': 40 is outside"),
    ("", r"is empty"),
    (HEADER + "\n", r"has no rows"),
])
def test_rejections_name_line_column_and_fix(tmp_path, body, pattern):
    p = _write(tmp_path, body)
    with pytest.raises(PrepError, match=pattern) as e:
        read_manifest(p, score_scale=GEARS)
    assert "m.csv" in str(e.value)


def test_all_problems_reported_together(tmp_path):
    p = _write(tmp_path, HEADER + "\na,a.avi,x,S,m\nb,b.avi,40,S,m\na,c.avi,20,S,m\n")
    with pytest.raises(PrepError) as e:
        read_manifest(p, score_scale=GEARS)
    msg = str(e.value)
    assert "3 problem(s)" in msg and "line 2" in msg and "line 3" in msg and "line 4" in msg


def test_missing_manifest_and_comment_lines(tmp_path):
    with pytest.raises(PrepError, match="does not exist"):
        read_manifest(str(tmp_path / "none.csv"))
    p = _write(tmp_path, HEADER.upper() + "\n# a comment,,,,\n\na,a.avi,20,S,m\n")
    (spec,) = read_manifest(p)
    assert spec.video_id == "a" and spec.origin == "m.csv line 4"


@pytest.mark.parametrize("value,expected", [
    ("gears", ("gears", 6, 30)), ("MGEARS", ("mgears", 6, 30)), ("m-gears", ("mgears", 6, 30)),
    ("grs", ("grs", 6, 30)), ("18,28", ("custom", 18, 28)), (" 0 , 1.5 ", ("custom", 0, 1.5)),
])
def test_score_scales_by_name_or_bounds(value, expected):
    s = parse_score_scale(value)
    assert (s.name, s.min, s.max) == expected


@pytest.mark.parametrize("value,pattern", [
    (None, "score scale is required; fix: pass --score_scale="),
    ("", "score scale is required"), ("gearz", "neither a named scale"),
    ("6", "neither a named scale"), ("30,6", "0 <= MIN < MAX"), ("-1,5", "0 <= MIN < MAX"),
    ("nan,30", "finite bounds"), ("6,inf", "finite bounds"),
])
def test_bad_score_scales_are_refused(value, pattern):
    with pytest.raises(ScoreScaleError, match=pattern):
        parse_score_scale(value)


def test_custom_scale_bounds_are_inclusive(tmp_path):
    p = _write(tmp_path, HEADER + "\na,a.avi,18,S,m\nb,b.avi,28,S,m\nc,c.avi,28.5,S,m\n")
    with pytest.raises(PrepError, match=r"line 4 \(video_id 'c'\).*28.5 is outside the score "
                                        r"scale custom 18-28") as e:
        read_manifest(p, score_scale=parse_score_scale("18,28"))
    assert "1 problem(s)" in str(e.value)


def _prepare_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "data_prep.prepare", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flags, pattern", [
    ([], r"the score scale is required; fix: pass --score_scale=gears\|mgears\|grs\|MIN,MAX"),
    (["--score_scale=gears"], r"line 3 \(video_id 'b'\), column 'score': 99 is outside the "
                              r"score scale gears 6-30"),
    (["--score_scale=6"], r"score scale '6' is neither a named scale"),
])
def test_prepare_cli_requires_the_scale_and_rejects_scores_off_it(tmp_path, flags, pattern):
    """The issue's case: a score of 99 without scale flags was accepted and written."""
    csv = _write(tmp_path, HEADER + "\na,a.avi,20,S,m\nb,b.avi,99,S,m\n")
    p = _prepare_cli(f"--manifest={csv}", f"--data_dir={tmp_path / 'out'}", "--name=x", *flags)
    assert p.returncode == 2, p.stderr[-2000:]
    assert re.search(pattern, p.stderr) and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) <= 2  # the summary line and the one problem
    assert not (tmp_path / "out").exists()


def test_jigsaws_scores_are_grs(tmp_path):
    p = _prepare_cli(f"--jigsaws_root={tmp_path}", "--task=Suturing",
                     f"--data_dir={tmp_path / 'out'}", "--score_scale=mgears")
    assert p.returncode == 2 and "JIGSAWS scores are GRS totals (grs 6-30)" in p.stderr, p.stderr


def test_jigsaws_meta_file_nan_and_off_scale_grs_name_line_and_trial(tmp_path):
    from data_prep.jigsaws import read_meta_file
    p = tmp_path / "meta_file_Suturing.txt"
    p.write_text("Suturing_B001\t\tN\t\tnan\t\t2\t\t2\t\t2\t\t2\t\t2\t\t3\n"
                 "Suturing_B002\t\tN\t\t99\t\t5\t\t5\t\t5\t\t5\t\t5\t\t5\n")
    with pytest.raises(PrepError) as e:
        read_meta_file(str(p), "Suturing")
    assert re.search(r"line 1: NaN or infinite score .* \(Suturing_B001\)", str(e.value))
    assert re.search(r"line 2: GRS 99 outside the grs 6-30 scale \(Suturing_B002\)", str(e.value))
