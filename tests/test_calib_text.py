"""Text-only calibration: text samples in every index form, raw-text inputs for models that read text only (as
msModelSlim tokenizes its LLM sets), text-only chat turns for image+text models.

Expected token ids come from the tokenizers library reading the folder's tokenizer.json itself, not from
transformers (which the code under test uses)."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, processors
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from dist_quant.calib import DEFAULT_TEXT_DATASET
from dist_quant.calib.dataset import CalibSample, load_samples
from dist_quant.calib.inputs import build_model_inputs
from dist_quant.errors import CalibrationError, CheckpointError
from dist_quant.synthetic import make_tiny_model, train_tokenizer

LONG_TEXT = "Numbers such as one, two, three and four appear often in the text. " * 60
CHINESE = "长江是中国最长的河流。"


def write_jsonl(path: Path, entries: list) -> Path:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


def write_image(path: Path) -> Path:
    Image.new("RGB", (12, 10), (200, 30, 60)).save(path)
    return path


def expected_ids(model_dir: Path, prompt: str, special_tokens: bool) -> list[int]:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(prompt, add_special_tokens=special_tokens).ids


def text_model(folder: Path, tokenizer=None) -> Path:
    """A Qwen3-MoE (text only) model folder as the Hub has it: config, weights, tokenizer; no image processor and no
    chat template."""
    tokenizer = tokenizer or train_tokenizer()
    tokenizer.chat_template = None
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=16)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not (folder / "preprocessor_config.json").exists() and not (folder / "chat_template.jinja").exists()
    return folder


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory) -> Path:
    return text_model(tmp_path_factory.mktemp("qwen3_moe") / "m")


@pytest.fixture(scope="module")
def with_bos(tmp_path_factory) -> Path:
    """The same, with a tokenizer that puts <|endoftext|> before every text, as Llama-style tokenizers add BOS."""
    tokenizer = train_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    return text_model(tmp_path_factory.mktemp("bos") / "m", tokenizer)


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory) -> Path:
    """The tiny Qwen3-VL-MoE folder without its preprocessor_config.json: text-only samples must not need it."""
    folder = make_tiny_model(tmp_path_factory.mktemp("vl") / "m", num_layers=1, vision_depth=1, deepstack=(0,))
    (folder / "preprocessor_config.json").unlink()
    return folder


# --- loading -----------------------------------------------------------------------------------------------------


def test_msmodelslim_llm_jsonl_is_read_as_text_samples(tmp_path):
    """msModelSlim's lab_calib/*.jsonl: one object a line, the text under "inputs_pretokenized", other keys (its
    "id") ignored; blank lines skipped."""
    index = tmp_path / "calib.jsonl"
    index.write_text('{"id": 1, "inputs_pretokenized": "Question: what is 2 + 2?\\nAnswer:"}\n\n'
                     '{"id": 2, "inputs_pretokenized": "' + CHINESE + '"}\n', encoding="utf-8")
    samples = load_samples(index, images=False)
    assert samples == [CalibSample(None, "Question: what is 2 + 2?\nAnswer:"), CalibSample(None, CHINESE)]
    assert [s.where for s in samples] == [f"{index} line 1", f"{index} line 3"]


@pytest.mark.parametrize("form", ["jsonl", "json", "folder"])
def test_text_entries_in_every_index_form(tmp_path, form):
    entries = [{"text": "first"}, {"text": CHINESE, "image": None}, {"inputs_pretokenized": "third"}]
    if form == "json":
        dataset = tmp_path / "index.json"
        dataset.write_text(json.dumps(entries))
    else:
        dataset = write_jsonl(tmp_path / "index.jsonl", entries)
        if form == "folder":
            dataset = tmp_path
    for images in (False, True):
        assert load_samples(dataset, "default text is for images only", images=images) == [
            CalibSample(None, "first"), CalibSample(None, CHINESE), CalibSample(None, "third")]


def test_a_mixed_index_keeps_its_order_for_image_text_models(tmp_path):
    image = write_image(tmp_path / "a.png")
    index = write_jsonl(tmp_path / "index.jsonl", [{"text": "words"}, {"image": "a.png"}, {"image": "a.png",
                                                                                          "text": "own"}])
    assert load_samples(index, "dflt") == [CalibSample(None, "words"), CalibSample(image, "dflt"),
                                           CalibSample(image, "own")]


def test_an_image_entry_is_refused_for_a_text_only_model(tmp_path):
    index = write_jsonl(tmp_path / "index.jsonl", [{"text": "words"}, {"image": "gone.png", "text": "t"}])
    with pytest.raises(CalibrationError) as error:
        load_samples(index, images=False)  # refused before the image is even looked for
    assert str(error.value) == (f"{index} line 2: has an image ('gone.png'), but the model reads text only; use a "
                                "text calibration set (an index.jsonl of {\"text\": ...} lines) such as the bundled "
                                f"{DEFAULT_TEXT_DATASET}")


def test_an_image_folder_is_refused_for_a_text_only_model(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(CalibrationError, match=rf"calibration folder {tmp_path} holds images \(a\.png, \.\.\.\) and no "
                                               r"index file, but the model reads text only; .* calibText"):
        load_samples(tmp_path, "t", images=False)


@pytest.mark.parametrize("entry, message", [
    ({"text": 3}, 'its "text" is a number, not a string'),
    ({"inputs_pretokenized": None}, 'its "inputs_pretokenized" is null, not a string'),
    ({"text": "a", "inputs_pretokenized": "b"}, 'has both "text" and "inputs_pretokenized"; keep one'),
    ({"text": " \n\t"}, "its text is empty; a sample without an image needs a text to calibrate on"),
    ({"id": 7}, 'expected an object with an "image" path, a "text" or both (or msModelSlim\'s '
                '"inputs_pretokenized" for the text), got an object with neither'),
    ({"text": "a\ud800b"}, "its text holds a lone surrogate (\\ud800 at character 1), which is not valid Unicode"),
])
def test_a_bad_text_entry_names_its_line(tmp_path, entry, message):
    index = write_jsonl(tmp_path / "index.jsonl", [{"text": "fine"}, entry])
    with pytest.raises(CalibrationError) as error:
        load_samples(index, "a default text does not stand in for a missing text", images=False)
    assert str(error.value).startswith(f"{index} line 2: {message}")


# --- inputs of a model that reads text only ------------------------------------------------------------------------


def test_raw_text_is_tokenized_without_a_template(qwen3_moe):
    texts = ["The quick brown fox jumps over the lazy dog.", CHINESE, "def f(x):\n    return x * 2\n"]
    inputs = build_model_inputs(qwen3_moe, [CalibSample(None, t) for t in texts], images=False)
    model = Qwen3MoeForCausalLM.from_pretrained(qwen3_moe).eval()
    for text, item in zip(texts, inputs):
        assert item.input_ids[0].tolist() == expected_ids(qwen3_moe, text, special_tokens=False)
        assert item.attention_mask.shape == item.input_ids.shape and item.attention_mask.all()
        assert item.pixel_values is None and item.image_grid_thw is None
        assert set(item.as_kwargs()) == {"input_ids", "attention_mask"}
        with torch.no_grad():
            logits = model(**item.as_kwargs()).logits
        assert logits.shape == (1, item.input_ids.shape[1], len(train_tokenizer())) and torch.isfinite(logits).all()


def test_raw_text_keeps_the_special_tokens_the_tokenizer_adds(with_bos):
    """msModelSlim calls tokenizer(text): a tokenizer that adds a BOS token gets it, and the cap counts it."""
    bos = expected_ids(with_bos, "<|endoftext|>", special_tokens=False)
    short, long = build_model_inputs(with_bos, [CalibSample(None, "Hello there"), CalibSample(None, LONG_TEXT)],
                                     images=False, max_tokens=40)
    assert short.input_ids[0].tolist() == expected_ids(with_bos, "Hello there", special_tokens=True)
    assert short.input_ids[0].tolist() == bos + expected_ids(with_bos, "Hello there", special_tokens=False)
    assert long.input_ids[0].tolist() == bos + expected_ids(with_bos, LONG_TEXT, special_tokens=False)[:39]


def test_a_long_raw_text_is_cut_to_the_cap_naming_its_line(qwen3_moe, tmp_path, caplog):
    index = write_jsonl(tmp_path / "calib.jsonl", [{"inputs_pretokenized": "short"},
                                                   {"inputs_pretokenized": LONG_TEXT}])
    with caplog.at_level(logging.WARNING, logger="dist_quant"):
        short, long = build_model_inputs(qwen3_moe, load_samples(index, images=False), images=False, max_tokens=50)
    full = expected_ids(qwen3_moe, LONG_TEXT, special_tokens=False)
    assert len(full) > 50 and long.input_ids[0].tolist() == full[:50]
    assert short.input_ids[0].tolist() == expected_ids(qwen3_moe, "short", special_tokens=False)
    (cut,) = [r.getMessage() for r in caplog.records if "is cut from" in r.getMessage()]
    assert cut.startswith(f"text-only calibration sample 2 ({index} line 2): its text is cut from {len(full)} to 50 "
                          "tokens")


def test_a_text_cut_to_nothing_is_refused(qwen3_moe):
    """One byte-level token of a Chinese character decodes to U+FFFD, which takes 3 tokens: no cut fits in 1."""
    assert len(expected_ids(qwen3_moe, CHINESE[0], special_tokens=False)) > 1
    with pytest.raises(CalibrationError, match=r"^text-only calibration sample 1 has no tokens \(its text is cut to "
                                               r"nothing within 1 tokens\); raise the cap"):
        build_model_inputs(qwen3_moe, [CalibSample(None, CHINESE)], images=False, max_tokens=1)


def test_an_image_sample_is_refused_for_a_text_only_model(qwen3_moe, tmp_path):
    image = write_image(tmp_path / "a.png")
    with pytest.raises(CalibrationError) as error:
        build_model_inputs(qwen3_moe, [CalibSample(None, "words"), CalibSample(image, "what is it?")], images=False)
    assert str(error.value) == (f"the model in {qwen3_moe} reads text only: calibration sample 2 has an image "
                                f"({image}); use a text calibration set (an index.jsonl of {{\"text\": ...}} lines) "
                                f"such as the bundled {DEFAULT_TEXT_DATASET}")


# --- text-only samples of an image+text model --------------------------------------------------------------------


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def test_a_text_sample_of_an_image_text_model_is_a_chat_turn(vl_model):
    texts = ["Hello there", CHINESE]
    inputs = build_model_inputs(vl_model, [CalibSample(None, t) for t in texts])  # no preprocessor_config.json
    for text, item in zip(texts, inputs):
        assert item.input_ids[0].tolist() == expected_ids(vl_model, chat_prompt(text), special_tokens=False)
        assert item.pixel_values is None and item.image_grid_thw is None


def test_a_text_sample_of_an_image_text_model_is_cut_inside_its_turn(vl_model):
    (item,) = build_model_inputs(vl_model, [CalibSample(None, LONG_TEXT)], max_tokens=40)
    fixed = len(expected_ids(vl_model, chat_prompt(""), special_tokens=False))
    kept = expected_ids(vl_model, LONG_TEXT, special_tokens=False)[:40 - fixed]
    text = Tokenizer.from_file(str(vl_model / "tokenizer.json")).decode(kept)
    assert item.input_ids[0].tolist() == expected_ids(vl_model, chat_prompt(text), special_tokens=False)
    assert item.input_ids.shape[1] == 40


def test_a_template_longer_than_the_cap_is_refused(vl_model):
    fixed = len(expected_ids(vl_model, chat_prompt(""), special_tokens=False))
    with pytest.raises(CalibrationError) as error:
        build_model_inputs(vl_model, [CalibSample(None, "hi")], max_tokens=3)
    assert str(error.value) == (f"text-only calibration sample 1 needs {fixed} tokens without any text (its template "
                                "and special tokens), more than the 3 tokens a calibration sample may hold; raise the "
                                "cap (--max_sample_tokens)")


def test_the_image_token_in_a_text_sample_is_refused(vl_model):
    with pytest.raises(CalibrationError, match=r"text-only calibration sample 1 holds <\|image_pad\|> tokens without "
                                               r"an image: the text must not contain <\|image_pad\|>"):
        build_model_inputs(vl_model, [CalibSample(None, "look <|image_pad|> here")])


def test_the_chat_template_is_needed_only_for_chat_turns(vl_model, tmp_path):
    """Raw text reads no template, so a base model without one works; a chat turn without a template is refused."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        if (vl_model / name).exists():
            shutil.copy(vl_model / name, bare / name)
    (item,) = build_model_inputs(bare, [CalibSample(None, "Hello there")], images=False)
    assert item.input_ids[0].tolist() == expected_ids(bare, "Hello there", special_tokens=False)
    with pytest.raises(CheckpointError, match="no chat template"):
        build_model_inputs(bare, [CalibSample(None, "Hello there")], images=True)
