import logging

import cv2
import numpy as np
import pytest

from conftest import make_course_dataset, make_ibug_dataset, mean_face, write_pts
from fkp_core.dataset import (
    DatasetError,
    detect_kind,
    parse_source,
    person_of,
    read_course,
    read_ibug,
    read_image,
    read_pts,
    split_by_identity,
)


def test_reads_generated_course_layout(tmp_path):
    make_course_dataset(tmp_path, n=10, people=3)
    recs = read_course(tmp_path)
    assert len(recs) == 10
    assert recs[0].keypoints.shape == (68, 2) and recs[0].keypoints.dtype == np.float32
    assert recs[0].person == "Person_00"
    assert recs[0].source == "course"


def _corrupt_row(tmp_path, line_no, new_line):
    csv = tmp_path / "training_frames_keypoints.csv"
    lines = csv.read_text().splitlines()
    lines[line_no - 1] = new_line(lines[line_no - 1])
    csv.write_text("\n".join(lines) + "\n")
    return csv


BAD_ROWS = {
    "wrong column count": (lambda ln: ln + ",1.0", "expected 137 columns, got 138"),
    "too few columns": (lambda ln: ",".join(ln.split(",")[:-2]), "expected 137 columns, got 135"),
    "non-numeric": (lambda ln: ln.replace(",", ",abc,", 1).rsplit(",", 1)[0], "non-numeric keypoint value 'abc'"),
    "nan": (lambda ln: ",".join(ln.split(",")[:5] + ["nan"] + ln.split(",")[6:]), "NaN or infinite"),
    "missing image": (lambda ln: "Nobody_00_00.jpg," + ln.split(",", 1)[1], "image file is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_and_row(tmp_path, case, caplog):
    make_course_dataset(tmp_path, n=6)
    edit, message = BAD_ROWS[case]
    csv = _corrupt_row(tmp_path, 4, edit)
    with pytest.raises(DatasetError) as err:
        read_course(tmp_path)
    assert f"{csv}:4" in str(err.value)
    assert message in str(err.value)
    with caplog.at_level(logging.WARNING):
        recs = read_course(tmp_path, on_error="skip")
    assert len(recs) == 5
    assert f"{csv}:4" in caplog.text


def test_unreadable_image_is_named(tmp_path):
    make_course_dataset(tmp_path, n=4)
    victim = sorted((tmp_path / "training").iterdir())[1]
    victim.write_bytes(b"this is not a picture")
    with pytest.raises(DatasetError, match=f"{victim.name}: not a readable image"):
        read_course(tmp_path)
    assert len(read_course(tmp_path, on_error="skip")) == 3


def test_missing_csv(tmp_path):
    with pytest.raises(DatasetError, match="training_frames_keypoints.csv: no such file"):
        read_course(tmp_path)


def test_rgba_png_named_jpg_loads(tmp_path):
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 255
    path = tmp_path / "face.jpg"
    ok, buf = cv2.imencode(".png", rgba)
    path.write_bytes(buf.tobytes())
    gray = read_image(path)
    assert gray.shape == (40, 50) and gray.dtype == np.uint8
    assert read_image(path, color=True).shape == (40, 50, 3)


def test_identity_split_is_disjoint_and_stable(tmp_path):
    make_course_dataset(tmp_path, n=60, people=20)
    recs = read_course(tmp_path)
    train, val = split_by_identity(recs, 0.25)
    assert {r.person for r in train}.isdisjoint({r.person for r in val})
    assert len(train) + len(val) == 60 and val
    again_train, again_val = split_by_identity(list(reversed(recs)), 0.25)
    assert {r.image_path for r in again_val} == {r.image_path for r in val}


def test_person_of():
    assert person_of("Luis_Fonsi_21.jpg") == "Luis_Fonsi"
    assert person_of("1051618982_1.jpg") == "1051618982"
    assert person_of("solo.jpg") == "solo"


# ---- iBUG .pts ----


def test_pts_is_converted_to_zero_based(tmp_path):
    kp = mean_face(80, (60, 60))
    write_pts(tmp_path / "a.pts", kp, one_based=True)
    assert np.allclose(read_pts(tmp_path / "a.pts"), kp, atol=1e-3)


def test_ibug_folder(tmp_path):
    make_ibug_dataset(tmp_path / "helen", n=5)
    recs = read_ibug(tmp_path / "helen")
    assert len(recs) == 5 and recs[0].source == "helen"
    assert recs[0].image_path.suffix == ".jpg"


def test_ibug_image_of_several_faces(tmp_path):
    """300-W names the faces of one photo NAME_1.pts, NAME_2.pts beside NAME.jpg."""
    kp = mean_face(50, (40, 40))
    cv2.imwrite(str(tmp_path / "photo.jpg"), np.full((100, 100), 128, np.uint8))
    write_pts(tmp_path / "photo_1.pts", kp)
    write_pts(tmp_path / "photo_2.pts", kp + 30)
    recs = read_ibug(tmp_path)
    assert [r.image_path.name for r in recs] == ["photo.jpg", "photo.jpg"]


BAD_PTS = {
    "wrong count": ("version: 1\nn_points: 67\n{\n" + "1 2\n" * 67 + "}\n", "expected 68 points"),
    "count mismatch": ("version: 1\nn_points: 68\n{\n" + "1 2\n" * 66 + "}\n", "the file has 66"),
    "no open brace": ("version: 1\nn_points: 68\n" + "1 2\n" * 68 + "}\n", "missing '{'"),
    "no close brace": ("version: 1\nn_points: 68\n{\n" + "1 2\n" * 68, "missing '}'"),
    "non-numeric": ("version: 1\nn_points: 68\n{\n" + "1 2\n" * 67 + "1 x\n}\n", "non-numeric keypoint value 'x'"),
    "three values": ("version: 1\nn_points: 68\n{\n" + "1 2\n" * 67 + "1 2 3\n}\n", "point 67 has 3 values"),
    "no header": ("{\n" + "1 2\n" * 68 + "}\n", "no n_points"),
}


@pytest.mark.parametrize("case", sorted(BAD_PTS))
def test_bad_pts_files_are_named(tmp_path, case):
    text, message = BAD_PTS[case]
    (tmp_path / "bad.pts").write_text(text)
    cv2.imwrite(str(tmp_path / "bad.jpg"), np.zeros((10, 10), np.uint8))
    with pytest.raises(DatasetError) as err:
        read_ibug(tmp_path)
    assert "bad.pts" in str(err.value) and message in str(err.value)


def test_pts_without_image(tmp_path):
    write_pts(tmp_path / "lonely.pts", mean_face(50))
    with pytest.raises(DatasetError, match="lonely.pts: no image beside it"):
        read_ibug(tmp_path)


def test_skip_bad_pts_keeps_good_ones(tmp_path, caplog):
    make_ibug_dataset(tmp_path, n=3)
    (tmp_path / "bad.pts").write_text("n_points: 68\n{\n}\n")
    with caplog.at_level(logging.WARNING):
        assert len(read_ibug(tmp_path, on_error="skip")) == 3
    assert "bad.pts" in caplog.text


def test_source_specs(tmp_path):
    make_course_dataset(tmp_path / "course", n=4)
    make_ibug_dataset(tmp_path / "helen", n=2)
    assert parse_source(str(tmp_path / "course")).kind == "course"
    src = parse_source(f"ibug:{tmp_path / 'helen'}@2.5")
    assert (src.kind, src.weight, src.label) == ("ibug", 2.5, "helen")
    assert detect_kind(tmp_path / "helen") == "ibug"
    assert len(src.read()) == 2
    with pytest.raises(DatasetError, match="no such directory"):
        parse_source(str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="weight"):
        parse_source(f"{tmp_path / 'helen'}@-1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="neither"):
        parse_source(str(tmp_path / "empty"))


def test_real_course_data(real_data):
    recs = read_course(real_data / "fkp", "test")
    assert len(recs) == 770
    people = {r.person for r in recs}
    assert len(people) == 347


def test_real_300w(real_data):
    assert len(read_ibug(real_data / "300w" / "afw")) == 337
