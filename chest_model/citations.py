"""The public chest X-ray collections this project knows: their links and BibTeX.

A training run names each data source (``--data-dir NAME=PATH``, or the folder's name). The model
card cites the collections those names point to, and nothing else: a source the table does not know
is listed in the card by its name, without a citation.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BIBTEX = {
    "cohen2020covid": """@article{cohen2020covid,
  title={COVID-19 image data collection},
  author={Joseph Paul Cohen and Paul Morrison and Lan Dao},
  journal={arXiv 2003.11597},
  url={https://github.com/ieee8023/covid-chestxray-dataset},
  year={2020}
}""",
    "kermany2018identifying": """@article{kermany2018identifying,
  title={Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep Learning},
  author={Kermany, Daniel S. and Goldbaum, Michael and Cai, Wenjia and Valentim, Carolina C. S. and Liang, Huiying and Baxter, Sally L. and McKeown, Alex and Yang, Ge and Wu, Xiaokang and Yan, Fangbing and others},
  journal={Cell},
  volume={172},
  number={5},
  pages={1122--1131.e9},
  year={2018},
  doi={10.1016/j.cell.2018.02.010}
}""",
    "wang2017chestxray8": """@inproceedings{wang2017chestxray8,
  title={ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax Diseases},
  author={Wang, Xiaosong and Peng, Yifan and Lu, Le and Lu, Zhiyong and Bagheri, Mohammadhadi and Summers, Ronald M.},
  booktitle={Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={2097--2106},
  year={2017},
  doi={10.1109/CVPR.2017.369}
}""",
    "chowdhury2020can": """@article{chowdhury2020can,
  title={Can AI Help in Screening Viral and COVID-19 Pneumonia?},
  author={Chowdhury, Muhammad E. H. and Rahman, Tawsifur and Khandakar, Amith and Mazhar, Rashid and Kadir, Muhammad Abdul and Mahbub, Zaid Bin and Islam, Khandakar Reajul and Khan, Muhammad Salman and Iqbal, Atif and Al Emadi, Nasser and Reaz, Mamun Bin Ibne and Islam, Mohammad Tariqul},
  journal={IEEE Access},
  volume={8},
  pages={132665--132676},
  year={2020},
  doi={10.1109/ACCESS.2020.3010287}
}""",
    "rahman2021exploring": """@article{rahman2021exploring,
  title={Exploring the Effect of Image Enhancement Techniques on COVID-19 Detection Using Chest X-ray Images},
  author={Rahman, Tawsifur and Khandakar, Amith and Qiblawey, Yazan and Tahir, Anas and Kiranyaz, Serkan and Kashem, Saad Bin Abul and Islam, Mohammad Tariqul and Al Maadeed, Somaya and Zughaier, Susu M. and Khan, Muhammad Salman and Chowdhury, Muhammad E. H.},
  journal={Computers in Biology and Medicine},
  volume={132},
  pages={104319},
  year={2021},
  doi={10.1016/j.compbiomed.2021.104319}
}""",
}


@dataclass(frozen=True)
class Collection:
    name: str
    url: str
    cites: tuple[str, ...]            # BibTeX keys: the works its authors ask to be cited
    matches: tuple[str, ...]          # substrings of a normalised source name that mean this collection
    note: str = ""
    origin: str = ""                  # the one institution its images come from, where there is one


# Checked in order: the first collection whose pattern occurs in a source's name is the one.
COLLECTIONS = (
    # Before the Radiography Database: its adult normals came from the RSNA challenge, which drew them
    # from NIH ChestX-ray14, so a source named for them shares its hospital with NIH's own releases.
    Collection("RSNA Pneumonia Detection Challenge images, via the COVID-19 Radiography Database",
               "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
               ("chowdhury2020can", "rahman2021exploring"), ("rsna",),
               note="the RSNA challenge drew its films from NIH ChestX-ray14", origin="NIH Clinical Center"),
    Collection("COVID-19 Radiography Database", "https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
               ("chowdhury2020can", "rahman2021exploring"), ("radiography",)),
    Collection("NIH ChestX-ray8 / ChestX-ray14", "https://nihcc.app.box.com/v/ChestXray-NIHCC",
               ("wang2017chestxray8",), ("nih", "cxr8", "cxr14", "chestx-ray", "chestxray8", "chestxray14"),
               origin="NIH Clinical Center"),
    Collection("COVID-19 Image Dataset (Kaggle, Pranav Raikote)", "https://www.kaggle.com/datasets/pranavraikokte/covid19-image-dataset",
               ("cohen2020covid", "kermany2018identifying"), ("covid19-image-dataset", "covid19-dataset", "covid-19-image-dataset"),
               note="compiled from the COVID-19 image data collection (https://github.com/ieee8023/covid-chestxray-dataset) "
                    "and the pediatric pneumonia images of Kermany et al. (https://data.mendeley.com/datasets/rscbjbr9sj/2)"),
    Collection("COVID-19 image data collection", "https://github.com/ieee8023/covid-chestxray-dataset",
               ("cohen2020covid",), ("covid-chestxray", "ieee8023")),
    Collection("Kermany et al. pediatric chest X-rays", "https://data.mendeley.com/datasets/rscbjbr9sj/2",
               ("kermany2018identifying",), ("kermany", "pediatric-pneumonia", "chest-xray-pneumonia")),
)


# The tutorial's dataset: children's Normal and Viral Pneumonia films against adults' Covid films.
REFERENCE_COLLECTION = next(c for c in COLLECTIONS if "covid19-image-dataset" in c.matches)


def collection_for(source: str) -> Collection | None:
    name = source.lower().replace("_", "-").replace(" ", "-")
    return next((c for c in COLLECTIONS if any(pattern in name for pattern in c.matches)), None)


def cited_sources(sources: Iterable[str], also_evaluated: Iterable[str] = ()) -> dict:
    """``{"collections": [{source, name, url, note}], "bibtex": [entries], "shared_origins": [...]}`` for a
    run's source names.

    Each BibTeX entry appears once, in the order the sources name them; unknown sources get
    ``name: None``. ``shared_origins`` lists ``{origin, sources}`` for every institution that two or
    more of the training and ``also_evaluated`` sources come from: one of them left out is not a new
    hospital, so a figure measured on it is optimistic for films from elsewhere.
    """
    sources = list(sources)
    collections, keys = [], []
    for source in sources:
        found = collection_for(source)
        collections.append({"source": source, "name": found.name if found else None,
                            "url": found.url if found else None, "note": found.note if found else ""})
        keys += [key for key in (found.cites if found else ()) if key not in keys]
    by_origin: dict[str, list[str]] = {}
    for source in dict.fromkeys([*sources, *also_evaluated]):
        found = collection_for(source)
        if found and found.origin:
            by_origin.setdefault(found.origin, []).append(source)
    shared = [{"origin": origin, "sources": names} for origin, names in by_origin.items() if len(names) > 1]
    return {"collections": collections, "bibtex": [BIBTEX[key] for key in keys], "shared_origins": shared}
