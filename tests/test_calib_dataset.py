"""Calibration sample loading: the three dataset forms and every way a dataset can be broken."""

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from dist_quant.calib.dataset import CalibSample, load_samples
from dist_quant.errors import CalibrationError


def write_image(path: Path, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 60)).save(path)
    return path


def write_jsonl(path: Path, entries: list) -> Path:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


@pytest.fixture
def image_dir(tmp_path) -> Path:
    for name in ["b.png", "a.jpg", "c.PNG", "d.webp", "e.bmp", "f.jpeg"]:
        write_image(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    return tmp_path / "imgs"


def test_jsonl_index_keeps_file_order_and_resolves_relative_paths(tmp_path):
    write_image(tmp_path / "sub" / "x.png")
    write_image(tmp_path / "y.png")
    index = write_jsonl(tmp_path / "index.jsonl", [{"image": "y.png", "text": "why"},
                                                   {"image": "sub/x.png", "text": "ex"}])
    samples = load_samples(index)
    assert samples == [
        CalibSample(image=(tmp_path / "y.png").absolute(), text="why"),
        CalibSample(image=(tmp_path / "sub" / "x.png").absolute(), text="ex"),
    ]


def test_json_index_with_default_text_for_missing_text(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    index = tmp_path / "index.json"
    index.write_text(json.dumps([{"image": "a.png", "text": "own"}, {"image": "b.png"}]))
    assert [s.text for s in load_samples(str(index), default_text="fallback")] == ["own", "fallback"]


def test_image_folder_is_sorted_and_uses_default_text(image_dir):
    samples = load_samples(image_dir, default_text="Describe.")
    assert [s.image.name for s in samples] == ["a.jpg", "b.png", "c.PNG", "d.webp", "e.bmp", "f.jpeg"]
    assert all(s.text == "Describe." and s.image.is_absolute() for s in samples)


def test_image_folder_without_default_text_is_refused(image_dir):
    with pytest.raises(CalibrationError, match="default text"):
        load_samples(image_dir)


def test_folder_with_one_index_file_uses_it(image_dir):
    write_jsonl(image_dir / "captions.jsonl", [{"image": "b.png", "text": "bee"}, {"image": "a.jpg"}])
    samples = load_samples(image_dir, default_text="dflt")
    assert [(s.image.name, s.text) for s in samples] == [("b.png", "bee"), ("a.jpg", "dflt")]


def test_entry_without_text_and_no_default_names_the_line(image_dir):
    write_jsonl(image_dir / "captions.jsonl", [{"image": "b.png", "text": "bee"}, {"image": "a.jpg"}])
    with pytest.raises(CalibrationError, match=r"captions\.jsonl line 2.*text"):
        load_samples(image_dir)


def test_folder_with_two_index_files_is_refused(image_dir):
    write_jsonl(image_dir / "one.jsonl", [{"image": "a.jpg", "text": "t"}])
    write_jsonl(image_dir / "two.json", [])
    with pytest.raises(CalibrationError, match="several index files"):
        load_samples(image_dir, default_text="t")


def test_samples_are_frozen(image_dir):
    sample = load_samples(image_dir, default_text="t")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        sample.text = "other"


@pytest.mark.parametrize("make", ["missing", "empty_dir", "empty_index", "not_an_index"])
def test_missing_or_empty_dataset(tmp_path, make):
    path = tmp_path / "data"
    if make == "empty_dir":
        path.mkdir()
    elif make == "empty_index":
        path = write_jsonl(tmp_path / "index.jsonl", [])
    elif make == "not_an_index":
        path = tmp_path / "index.txt"
        path.write_text("a.png")
    with pytest.raises(CalibrationError, match=str(path.name)):
        load_samples(path, default_text="t")


def test_missing_image_names_the_index_line(tmp_path):
    write_image(tmp_path / "a.png")
    index = write_jsonl(tmp_path / "index.jsonl", [{"image": "a.png", "text": "t"}, {"image": "gone.png", "text": "t"}])
    with pytest.raises(CalibrationError, match=r"index\.jsonl line 2.*gone\.png.*does not exist"):
        load_samples(index)


def test_unreadable_image_is_refused(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    index = write_jsonl(tmp_path / "index.jsonl", [{"image": "broken.png", "text": "t"}])
    with pytest.raises(CalibrationError, match=r"index\.jsonl line 1.*broken\.png cannot be read"):
        load_samples(index)


def test_unreadable_image_in_plain_folder_is_refused(tmp_path):
    write_image(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match=r"bad\.jpg cannot be read"):
        load_samples(tmp_path, default_text="t")


def test_bad_jsonl_names_file_and_line(tmp_path):
    write_image(tmp_path / "a.png")
    index = tmp_path / "index.jsonl"
    index.write_text('{"image": "a.png", "text": "t"}\n\n{"image": "a.png", "text": \n')
    with pytest.raises(CalibrationError, match=r"index\.jsonl line 3 is not valid JSON"):
        load_samples(index)


def test_bad_json_names_file_and_line(tmp_path):
    index = tmp_path / "index.json"
    index.write_text('[\n  {"image": "a.png", "text": "t"},\n  {"image": oops}\n]')
    with pytest.raises(CalibrationError, match=r"index\.json line 3 is not valid JSON"):
        load_samples(index)


def test_json_index_must_be_a_list(tmp_path):
    index = tmp_path / "index.json"
    index.write_text('{"image": "a.png", "text": "t"}')
    with pytest.raises(CalibrationError, match="JSON list"):
        load_samples(index)


@pytest.mark.parametrize("entry, got", [(["a.png", "t"], "got a list"), ({"id": 3}, "got an object with neither"),
                                        ({"image": 3, "text": "t"}, "its \"image\" is a number, not a path"),
                                        ("a.png", "got a string")])
def test_malformed_entry_is_refused(tmp_path, entry, got):
    index = write_jsonl(tmp_path / "index.jsonl", [{"text": "fine"}, entry])
    with pytest.raises(CalibrationError, match=r"index\.jsonl line 2: .*\"image\"") as error:
        load_samples(index, default_text="t")
    assert got in str(error.value)


@pytest.mark.parametrize("escape", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_image_path_escaping_the_index_folder_is_refused(tmp_path, escape):
    outside = write_image(tmp_path / "outside.png")
    data = tmp_path / "data"
    data.mkdir()
    image = str(outside) if escape == "ABSOLUTE" else escape
    index = write_jsonl(data / "index.jsonl", [{"image": image, "text": "t"}])
    with pytest.raises(CalibrationError, match="leaves the dataset folder"):
        load_samples(index)


def test_index_path_through_its_own_folder_is_inside(tmp_path):
    """``a/../a/index.jsonl`` is the folder ``a``: its images are inside (before the fix: "leaves the dataset
    folder", the normalised image path compared with the unnormalised folder)."""
    write_image(tmp_path / "a" / "x.png")
    write_jsonl(tmp_path / "a" / "index.jsonl", [{"image": "x.png", "text": "t"}])
    assert load_samples(f"{tmp_path}/a/../a/index.jsonl") == [CalibSample(image=tmp_path / "a" / "x.png", text="t")]


@pytest.mark.parametrize("escape", ["../outside.png", "link.png"])
def test_index_path_through_its_own_folder_still_refuses_escapes(tmp_path, escape):
    outside = write_image(tmp_path / "outside.png")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "link.png").symlink_to(outside)
    index = write_jsonl(tmp_path / "a" / "index.jsonl", [{"image": escape, "text": "t"}])
    with pytest.raises(CalibrationError, match="leaves the dataset folder" if escape.startswith("..") else
                       f"is a symlink to {outside}, outside the dataset folder"):
        load_samples(f"{tmp_path}/a/../a/{index.name}")


@pytest.mark.parametrize("field, what", [("text", "its text"), ("image", "its image path")])
def test_lone_surrogate_is_refused_naming_the_sample(tmp_path, field, what):
    """json.dumps writes the lone surrogate as the escape ``\\ud800``, as a hostile calibration file would."""
    write_image(tmp_path / "x.png")
    entry = {"image": "x.png", "text": "t"}
    entry[field] = "a\ud800" + entry[field]
    index = write_jsonl(tmp_path / "index.jsonl", [{"image": "x.png", "text": "fine"}, entry])
    assert "\\ud800" in index.read_text()
    with pytest.raises(CalibrationError) as error:
        load_samples(index)
    assert str(error.value) == (f"{index} line 2: {what} holds a lone surrogate (\\ud800 at character 1), which is "
                                "not valid Unicode; fix or remove it")


def test_lone_surrogate_in_the_default_text_is_refused(tmp_path, image_dir):
    index = write_jsonl(tmp_path / "index.jsonl", [{"image": "imgs/a.jpg"}])
    for dataset, where in [(index, f"{index} line 1"), (image_dir, f"image folder {image_dir}")]:
        with pytest.raises(CalibrationError, match=rf"^{where}: the default text holds a lone surrogate \(\\udfff at "
                                                   r"character 0\)"):
            load_samples(dataset, "\udfff")
