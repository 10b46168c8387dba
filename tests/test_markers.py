"""Tests by cost (issue 31): after collection every test is exactly one of ``unit``, ``integration`` and ``gpu``
(tests/conftest.py marks ``unit`` what is neither), and every test tests/conftest.py names as integration exists."""
from __future__ import annotations

import pathlib

from conftest import COST_MARKS, INTEGRATION_TESTS


def test_every_collected_test_is_exactly_one_of_unit_integration_and_gpu(request):
    items = request.session.items
    assert request.node in items
    wrong = {item.nodeid: [m for m in COST_MARKS if item.get_closest_marker(m) is not None] for item in items}
    wrong = {nodeid: marks for nodeid, marks in wrong.items() if len(marks) != 1}
    assert not wrong, f"tests that are not exactly one of {COST_MARKS}: {wrong}"


def test_the_integration_tests_named_in_conftest_exist():
    here = pathlib.Path(__file__).parent
    missing = {}
    for name, tests in INTEGRATION_TESTS.items():
        source = (here / name).read_text() if (here / name).exists() else ""
        absent = [t for t in (tests or ()) if f"def {t}(" not in source]
        if not source or absent:
            missing[name] = absent or "no such file"
    assert not missing, f"tests/conftest.py names integration tests that do not exist: {missing}"
