"""Config validation of routing and destinations; the rule engine on made-up series."""

from __future__ import annotations

import pytest

from dicomnode.config import parse_config
from dicomnode.errors import ConfigError
from dicomnode.routing.rules import SeriesInfo, decide, evaluate, explain, orientation_of

PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def test_sender_return_address() -> None:
    cfg = parse_config({"destinations": [PACS],
                        "allowed_callers": [{"ae_title": "PACS1", "return_to": "pacs"}],
                        "routing": [{"name": "r", "model": "m", "destinations": ["@sender"]}]})
    assert cfg.resolve_destinations(("@sender",), "PACS1") == ["pacs"]
    assert cfg.resolve_destinations(("@sender", "pacs"), "OTHER") == ["pacs"]


@pytest.mark.parametrize("bad, field", [
    ({"routing": [{"name": "r", "model": "m", "destinations": ["nowhere"]}]}, "routing.0"),
    ({"allowed_callers": [{"ae_title": "A", "return_to": "nowhere"}]}, "return_to"),
    ({"destinations": [{"name": "x", "protocol": "stowrs"}]}, "destinations.0"),
    ({"destinations": [{"name": "x", "ae_title": "A"}]}, "destinations.0"),
    ({"destinations": [{**PACS, "objects": ["seg", "pdf"]}]}, "objects"),
    ({"routing": [{"name": "r", "model": "m", "match": {"slice_thickness": {"min": 5, "max": 1}}}]},
     "slice_thickness"),
    ({"routing": [{"name": "r", "model": "m", "match": {"body_part": "(unclosed"}}]}, "body_part"),
])
def test_bad_routing_config_names_the_field(bad: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(bad)
    assert field in str(err.value)


def _series(uid: str, **kw: object) -> SeriesInfo:
    base: dict[str, object] = dict(study_uid="1.2", series_uid=uid, modality="CT",
                                   study_description="CHEST", image_type=("ORIGINAL", "AXIAL"),
                                   slice_thickness=1.0, orientation="axial", instances=300)
    base.update(kw)
    return SeriesInfo(**base)  # type: ignore[arg-type]


def test_thinnest_non_localizer_axial_series_is_selected() -> None:
    cfg = parse_config({"routing": [{"name": "lung", "model": "lung_density", "priority": "stat",
                                     "match": {"modality": ["CT"], "body_part": "chest",
                                               "orientation": "axial"}}]})
    series = [
        _series("1.1", slice_thickness=5.0, instances=64),
        _series("1.2", slice_thickness=1.0),
        _series("1.3", slice_thickness=0.5, image_type=("ORIGINAL", "LOCALIZER")),
        _series("1.4", slice_thickness=0.6, orientation="coronal"),
    ]
    [d] = decide(cfg.routing, series)
    assert (d.series.series_uid, d.priority, d.model) == ("1.2", "stat", "lung_density")
    text = explain(evaluate(cfg.routing, series))
    assert "ImageType contains LOCALIZER" in text and "orientation is coronal" in text


def test_final_rule_stops_and_no_rule_means_nothing() -> None:
    cfg = parse_config({"routing": [
        {"name": "a", "model": "m1", "final": True, "match": {"modality": ["CT"]}},
        {"name": "b", "model": "m2", "match": {"modality": ["CT"]}},
    ]})
    assert [d.rule for d in decide(cfg.routing, [_series("1.1")])] == ["a"]
    assert decide(cfg.routing, [_series("1.1", modality="MR")]) == []
    assert decide((), [_series("1.1")]) == []


def test_orientation_names() -> None:
    assert orientation_of([1, 0, 0, 0, 1, 0]) == "axial"
    assert orientation_of([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert orientation_of([1, 0, 0, 0, 0, -1]) == "coronal"
    assert orientation_of([1, 0, 0, 0, 0.7071, 0.7071]) == "oblique"
    assert orientation_of(None) is None
