"""Figures per subgroup from a CSV that describes the evaluated films."""
import numpy as np
import pytest

from chest_model.subgroups import NOT_LISTED, SubgroupError, read_subgroup_table, subgroup_figures, subgroup_lines

CLASSES = ["Normal", "Covid", "Viral Pneumonia"]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_rows_match_the_longest_tail_of_the_image_path(tmp_path):
    csv = write(tmp_path / "m.csv", "file,view\nNormal/a.png,AP\nb.png,PA\nnih/Covid/a.png,PA\n")
    table = read_subgroup_table([csv], ["view"])
    assert table.row_for("/data/nih/Normal/a.png") == {"view": "AP"}
    assert table.row_for("/data/nih/Covid/a.png") == {"view": "PA"}   # same name, another class: its own row
    assert table.row_for("/x/Covid/b.png") == {"view": "PA"}
    assert table.row_for("/data/Normal/c.png") is None


def test_figures_per_value_per_band_and_for_images_the_csv_does_not_list(tmp_path):
    ages = list(range(20, 80, 5))  # 12 ages: more values than a table per value would show
    rows = "".join(f"Normal/{i}.png,{'AP' if i % 3 == 0 else 'PA'},{age}\n" for i, age in enumerate(ages))
    table = read_subgroup_table([write(tmp_path / "m.csv", "file,view,age\n" + rows)], ["view,age"])
    files = [f"/d/Normal/{i}.png" for i in range(len(ages))] + ["/d/Normal/extra.png"]
    labels = np.zeros(len(files), int)
    called_covid = np.array([i % 3 == 0 for i in range(len(files))])   # the AP films
    probabilities = np.where(called_covid[:, None], [0.1, 0.8, 0.1], [0.8, 0.1, 0.1])
    uncertain = np.zeros(len(files), bool)
    uncertain[1] = True
    report = subgroup_figures(table, files, labels, probabilities, uncertain, CLASSES)

    assert report["not_listed"] == 1
    view = report["columns"]["view"]
    assert list(view) == ["AP", "PA", NOT_LISTED]
    assert view["AP"]["n"] == 4 and view["AP"]["predicted_share"]["Covid"] == 1.0 and view["AP"]["accuracy"] == 0
    assert view["PA"]["n"] == 8 and view["PA"]["predicted_share"]["Normal"] == 1.0
    assert view["PA"]["uncertain_rate"] == pytest.approx(1 / 8)
    assert view["AP"]["predicted_share_by_true_class"] == {"Normal": view["AP"]["predicted_share"]}
    bands = report["columns"]["age"]
    assert list(bands)[:4] == ["20-33", "34-47", "48-61", "62-75"] and list(bands)[-1] == NOT_LISTED
    assert sum(row["n"] for row in bands.values()) == len(files)
    text = "\n".join(subgroup_lines(report, CLASSES))
    assert "1 images not in it" in text and "AP" in text and "62-75" in text


def test_a_word_among_many_numbers_stays_its_own_group(tmp_path):
    rows = "".join(f"{i}.png,{20 + 3 * i}\n" for i in range(12)) + "x.png,unknown\n"
    table = read_subgroup_table([write(tmp_path / "m.csv", "file,age\n" + rows)], ["age"])
    files = [f"{i}.png" for i in range(12)] + ["x.png"]
    report = subgroup_figures(table, files, np.zeros(13, int), np.tile([0.8, 0.1, 0.1], (13, 1)), np.zeros(13), CLASSES)
    groups = report["columns"]["age"]
    assert len(groups) == 5 and list(groups)[-1] == "unknown" and groups["unknown"]["n"] == 1


def test_few_numeric_values_and_blanks_are_reported_as_they_are(tmp_path):
    csv = write(tmp_path / "m.csv", "file,grade\na.png,2\nb.png,10\nc.png,\n")
    table = read_subgroup_table([csv], ["grade"])
    probabilities = np.tile([0.8, 0.1, 0.1], (3, 1))
    report = subgroup_figures(table, ["a.png", "b.png", "c.png"], np.zeros(3, int), probabilities, np.zeros(3), CLASSES)
    assert list(report["columns"]["grade"]) == ["2", "10", "(blank)"]   # numeric order, not "10" before "2"


def test_several_csvs_make_one_table_and_a_column_one_lacks_is_blank(tmp_path):
    nih = write(tmp_path / "nih.csv", "file,view\nnih/a.png,AP\n")
    rsna = write(tmp_path / "rsna.csv", "file,width\nrsna/a.png,224\n")
    table = read_subgroup_table([nih, rsna], ["view"])
    assert table.row_for("/d/nih/a.png") == {"view": "AP"} and table.row_for("/d/rsna/a.png") == {"view": ""}


@pytest.mark.parametrize("text, columns, message", [
    ("name,view\na.png,AP\n", ["view"], "no 'file' column"),
    ("file,view\na.png,AP\n", ["age"], "no column 'age'"),
    ("file,view\na.png,AP\n./a.png,PA\n", ["view"], "line 3: 'a.png' is listed twice"),
    ("file,view\n,AP\n", ["view"], "line 2: empty 'file'"),
    ("file,view\na.png,AP\n", [], "--subgroup-by"),
])
def test_a_csv_that_cannot_be_used_is_an_error_naming_it(tmp_path, text, columns, message):
    csv = write(tmp_path / "m.csv", text)
    with pytest.raises(SubgroupError, match=message) as err:
        read_subgroup_table([csv], columns)
    assert "m.csv" in str(err.value) or not columns


def test_a_missing_or_binary_csv_is_an_error_naming_it(tmp_path):
    with pytest.raises(SubgroupError, match="nothing.csv: no such file"):
        read_subgroup_table([tmp_path / "nothing.csv"], ["view"])
    (tmp_path / "x.csv").write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(SubgroupError, match="x.csv: cannot be read as a CSV file"):
        read_subgroup_table([tmp_path / "x.csv"], ["view"])


@pytest.mark.parametrize("text", ["file;view\r\na.png;AP\r\n", "file\tview\na.png\tAP\n", "file, view\na.png, AP\n"])
def test_semicolons_tabs_and_spaces_after_commas_are_read(tmp_path, text):
    table = read_subgroup_table([write(tmp_path / "m.csv", text)], ["view"])
    assert table.row_for("/d/Normal/a.png") == {"view": "AP"}


def test_a_row_that_describes_several_evaluated_images_is_refused_naming_them(tmp_path):
    # The tutorial's dataset repeats file names across class folders: a bare name cannot say which film it describes.
    table = read_subgroup_table([write(tmp_path / "m.csv", "file,site\n0101.jpeg,A\nNormal/0102.jpeg,B\n")], ["site"])
    files = ["test/Covid/0101.jpeg", "test/Normal/0101.jpeg", "test/Normal/0102.jpeg", "test/Covid/0102.jpeg"]
    with pytest.raises(SubgroupError, match=r"1 row\(s\) describe several images at once, e.g. '0101.jpeg' describes 2 "
                                            r"\(Covid/0101.jpeg, Normal/0101.jpeg\)"):
        table.rows_for(files)
    assert table.rows_for(files[2:]) == [{"site": "B"}, None]  # Normal/0102.jpeg names one film
