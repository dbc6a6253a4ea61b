"""citations.py: which public collection a source name means, and the card's citations for a run."""
import re

import pytest

from chest_model.citations import BIBTEX, COLLECTIONS, REFERENCE_COLLECTION, cited_sources, collection_for


@pytest.mark.parametrize("source, expected", [
    ("covid19-dataset", "COVID-19 Image Dataset (Kaggle, Pranav Raikote)"),
    ("COVID19_Image Dataset", "COVID-19 Image Dataset (Kaggle, Pranav Raikote)"),  # case, '_' and ' ' normalised
    ("nih-cxr8-darkcovidnet", "NIH ChestX-ray8 / ChestX-ray14"),
    # RSNA's normals came through the Radiography Database: the more specific collection wins.
    ("rsna-covid19-radiography-db", "RSNA Pneumonia Detection Challenge images, via the COVID-19 Radiography Database"),
    ("covid19-radiography-database", "COVID-19 Radiography Database"),
    ("my-hospital-2024", None),
])
def test_a_source_name_means_at_most_one_collection(source, expected):
    found = collection_for(source)
    assert (found.name if found else None) == expected


def test_every_collection_cites_entries_that_exist_under_their_own_key():
    for key, entry in BIBTEX.items():
        assert re.match(rf"@\w+\{{{key},", entry), key
    for collection in COLLECTIONS:
        assert collection.cites and set(collection.cites) <= set(BIBTEX), collection.name
    assert REFERENCE_COLLECTION.cites == ("cohen2020covid", "kermany2018identifying")


def test_each_work_is_cited_once_in_the_order_the_sources_name_it():
    cited = cited_sources(["covid19-dataset", "nih-cxr8", "covid-chestxray-extra", "local-clinic"])
    assert [c["name"] for c in cited["collections"]] == [
        "COVID-19 Image Dataset (Kaggle, Pranav Raikote)", "NIH ChestX-ray8 / ChestX-ray14", "COVID-19 image data collection", None]
    assert cited["collections"][3] == {"source": "local-clinic", "name": None, "url": None, "note": ""}
    assert cited["bibtex"] == [BIBTEX["cohen2020covid"], BIBTEX["kermany2018identifying"], BIBTEX["wang2017chestxray8"]]
    assert cited["shared_origins"] == []


def test_sources_from_one_hospital_are_named_also_when_one_is_only_evaluated():
    trained = cited_sources(["covid19-dataset", "nih-cxr8"], also_evaluated=["rsna-normals", "nih-cxr8"])
    assert trained["shared_origins"] == [{"origin": "NIH Clinical Center", "sources": ["nih-cxr8", "rsna-normals"]}]
    assert [c["source"] for c in trained["collections"]] == ["covid19-dataset", "nih-cxr8"]  # evaluated sets are not cited
