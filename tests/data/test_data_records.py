"""Face record (de)serialisation and CSV label typing."""
import pytest

from mefem_jax.data import records


def test_record_round_trip_keeps_id_labels_and_bytes():
    image = bytes(range(256)) * 3
    labels = {"age": 31, "bmi": 22.5, "note": "naïve ✓"}
    data = records.encode_record("a/b.jpg", labels, image)
    assert records.decode_record(data) == ("a/b.jpg", labels, image)


@pytest.mark.parametrize("data, message", [
    (b"", "not a face record"),
    (b"\xff\xd8\xff\xe0 plain jpeg bytes", "not a face record"),
    (records.MAGIC + b"\xff\x00\x00\x00{}", "cut short"),
    (records.MAGIC + b"\x02\x00\x00\x00{]", "unreadable record header"),
])
def test_bad_record_bytes_raise_record_error(data, message):
    with pytest.raises(records.RecordError, match=message):
        records.decode_record(data)


def test_cast_label():
    assert records.cast_label(" 42 ", "int") == 42
    assert records.cast_label("3.0", "int") == 3
    assert records.cast_label("2.5", "float") == 2.5
    assert records.cast_label("", "str") == ""
    with pytest.raises(ValueError, match="missing value"):
        records.cast_label("  ", "int")
    with pytest.raises(ValueError, match="not a number"):
        records.cast_label("abc", "float")
    with pytest.raises(ValueError, match="not an integer"):
        records.cast_label("3.5", "int")
    with pytest.raises(ValueError, match="not a finite number"):
        records.cast_label("nan", "float")


def test_infer_label_type_lets_a_few_typos_be_skipped_not_turn_the_column_to_text():
    assert records.infer_label_type(["1", "2", "30"]) == "int"
    assert records.infer_label_type(["1", "2.5", ""]) == "float"
    assert records.infer_label_type(["1", "2", "abc", ""]) == "int"   # "abc" row gets skipped
    assert records.infer_label_type(["train", "test", "1"]) == "str"
    assert records.infer_label_type(["", ""]) == "str"
