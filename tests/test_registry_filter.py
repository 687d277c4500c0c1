"""The `?filter=` language: go-bexpr's grammar and evaluation against Consul-shaped objects."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import pytest

from registry.errors import BadRequestError
from registry.filter import MAX_DEPTH, And, Filter, Match, Not, Op, Or, compile_filter

# /v1/health/service/web: one entry.
HEALTH: dict[str, Any] = {
    "Node": {
        "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
        "Node": "node-1",
        "Address": "10.1.10.12",
        "Datacenter": "dc1",
        "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"},
        "Meta": {"env": "prod", "rack": "r-7", "some key": "spaced", "version": "2"},
        "CreateIndex": 5,
        "ModifyIndex": 9,
    },
    "Service": {
        "ID": "web-1",
        "Service": "web",
        "Tags": ["v1", "primary"],
        "Address": "",
        "Port": 8080,
        "Meta": {"team": "edge"},
        "Weights": {"Passing": 10, "Warning": 1},
        "TaggedAddresses": None,
        "EnableTagOverride": False,
        "CreateIndex": 7,
        "ModifyIndex": 7,
    },
    "Checks": [
        {
            "Node": "node-1",
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Definition": {},
        },
        {
            "Node": "node-1",
            "CheckID": "service:web-1",
            "Name": "Service 'web' check",
            "Status": "critical",
            "Output": "HTTP GET http://10.1.10.12:8080/health: 503",
            "ServiceID": "web-1",
            "ServiceName": "web",
            "ServiceTags": ["v1", "primary"],
            "Type": "http",
            "Definition": {"Interval": "10s", "HTTP": "http://10.1.10.12:8080/health"},
        },
    ],
}

# /v1/catalog/service/db: one entry.
CATALOG: dict[str, Any] = {
    "ID": "b8d1ad19-a8a7-4a3b-b0d9-9c1d1ad6b1c0",
    "Node": "node-2",
    "Address": "10.1.10.13",
    "Datacenter": "dc1",
    "NodeMeta": {"env": "staging"},
    "ServiceID": "db-1",
    "ServiceName": "db",
    "ServiceTags": ["primary", "pg-15"],
    "ServiceAddress": "10.1.10.13",
    "ServicePort": 5432,
    "ServiceMeta": {"some key": "with space", "az": "eu-1a", "version": "15.4"},
    "ServiceWeights": {"Passing": 1, "Warning": 1},
    "ServiceEnableTagOverride": True,
    "CreateIndex": 11,
    "ModifyIndex": 12,
}

# /v1/agent/services: one value.
AGENT: dict[str, Any] = {
    "ID": "redis-1",
    "Service": "redis",
    "Tags": [],
    "Meta": {},
    "Port": 6379,
    "Address": "127.0.0.1",
    "Weights": {"Passing": 1, "Warning": 1},
    "EnableTagOverride": False,
    "Datacenter": "dc1",
    "Coordinate": 0.25,
}


def ok(expression: str, obj: dict[str, Any]) -> bool:
    return compile_filter(expression).matches(obj)


def error(expression: str) -> str:
    with pytest.raises(BadRequestError) as info:
        compile_filter(expression)
    assert info.value.status == 400
    return info.value.message


# -- operators -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        # == / != on strings, quoted, raw, or bare
        ('Service.Service == "web"', True),
        ("Service.Service == `web`", True),
        ("Service.Service == web", True),
        ('Service.Service == "db"', False),
        ('Service.Service != "db"', True),
        ('Service.Service != "web"', False),
        ('Service.Address == ""', True),
        # contains / in on lists
        ('Service.Tags contains "v1"', True),
        ('Service.Tags contains "v2"', False),
        ('Service.Tags not contains "v2"', True),
        ('Service.Tags not contains "v1"', False),
        ('"primary" in Service.Tags', True),
        ('"secondary" in Service.Tags', False),
        ('"secondary" not in Service.Tags', True),
        ('"primary" not in Service.Tags', False),
        ("primary in Service.Tags", True),
        # ... on strings: substring
        ('Node.Address contains "10.1"', True),
        ('"10.1" in Node.Address', True),
        ('"192." in Node.Address', False),
        ('Node.Address not contains "192."', True),
        # ... on maps: keys
        ('"env" in Node.Meta', True),
        ('"prod" in Node.Meta', False),
        ('Node.Meta contains "rack"', True),
        ('Node.Meta not contains "zone"', True),
        # emptiness
        ("Service.Address is empty", True),
        ("Service.Service is empty", False),
        ("Service.Service is not empty", True),
        ("Service.Tags is not empty", True),
        ("Service.Meta is not empty", True),
        ("Node.Meta is empty", False),
        ("Checks is not empty", True),
        # regular expressions (unanchored search, RE2 syntax)
        ('Service.Service matches "^w.b$"', True),
        ('Service.Service matches "eb"', True),
        ('Service.Service matches "^eb"', False),
        ('Service.Service not matches "^db"', True),
        ('Service.Service not matches "web"', False),
        ('Node.Meta.rack matches "^r-[[:digit:]]+$"', True),
        (r"Node.Address matches `^\d+\.\d+\.\d+\.\d+$`", True),
        ('Node.Node matches "(?i)NODE-1"', True),
        (r'Node.Meta.env matches "\\Aprod\\z"', True),
    ],
)
def test_operators_on_a_health_entry(expression: str, expected: bool) -> None:
    assert ok(expression, HEALTH) is expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('ServiceName == "db"', True),
        ('ServiceMeta["some key"] == "with space"', True),
        ('ServiceMeta[ "some key" ] == "with space"', True),
        ("ServiceMeta[`some key`] == `with space`", True),
        ('ServiceMeta["some key"] contains "space"', True),
        ('ServiceMeta["missing key"] is empty', True),
        ('ServiceMeta.az matches "^eu-"', True),
        ('"pg-15" in ServiceTags', True),
        ("ServicePort == 5432", True),
        ("ServicePort != 5432", False),
        ('ServicePort == "5432"', True),
        ('ServicePort == "0x1538"', True),  # Go's ParseInt, base 0
        ("ServiceEnableTagOverride == true", True),
        ("ServiceEnableTagOverride == True", True),
        ("ServiceEnableTagOverride == 1", True),
        ('ServiceEnableTagOverride == "t"', True),
        ("ServiceEnableTagOverride != false", True),
        ("ServiceWeights.Passing == 1", True),
        ('NodeMeta.env == "staging" and ServiceName == db', True),
        ('ServiceMeta.version == "15.4"', True),  # a string field compares text
        ("ServiceMeta.version == 15.4", True),
        ("ServiceMeta.version == 15.40", False),
    ],
)
def test_catalog_service_entry(expression: str, expected: bool) -> None:
    assert ok(expression, CATALOG) is expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Service == redis", True),
        ("Tags is empty", True),
        ('"x" in Tags', False),
        ('"x" not in Tags', True),
        ("Meta is empty", True),
        ("Port == 6379 and EnableTagOverride == false", True),
        ("Coordinate == 0.25", True),
        ("Coordinate == 0.5", False),
        ("Coordinate != 0.5", True),
        ("Weights.Warning == 1", True),
        ("Port == 6379.0", True),  # numbers compare by value
    ],
)
def test_agent_service(expression: str, expected: bool) -> None:
    assert ok(expression, AGENT) is expected


# -- lists of objects: go-bexpr's ANY rule ----------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("Checks.Status == passing", True),
        ("Checks.Status == critical", True),
        ("Checks.Status == warning", False),
        # != applies per element too: "some check is not passing"
        ("Checks.Status != passing", True),
        ("Checks.Status != warning", True),
        ("not Checks.Status == critical", False),
        ('Checks.CheckID == "serfHealth"', True),
        ('Checks.ServiceTags contains "v1"', True),
        ("Checks.ServiceTags is empty", True),  # serfHealth's is
        ('Checks.Definition.Interval == "10s"', True),
        ('Checks.Output matches "503$"', True),
        ('Checks.Name not matches "Serf"', True),
        # a decimal segment indexes the list instead
        ("Checks.0.Status == passing", True),
        ("Checks.1.Status == passing", False),
        ('"/Checks/1/Status" == critical', True),
        ("Checks.9.Status == passing", False),
        ("Checks.9.Status != passing", True),
    ],
)
def test_selector_through_a_list(expression: str, expected: bool) -> None:
    assert ok(expression, HEALTH) is expected


def test_all_checks_passing_is_written_with_not() -> None:
    healthy = {**HEALTH, "Checks": [dict(c, Status="passing") for c in HEALTH["Checks"]]}
    expression = "not Checks.Status != passing"
    assert ok(expression, healthy) is True
    assert ok(expression, HEALTH) is False


@pytest.mark.parametrize("op", ["== x", "!= x", "is empty", "is not empty", 'matches "."'])
def test_an_empty_list_matches_nothing_whatever_the_operator(op: str) -> None:
    entry = {**HEALTH, "Checks": []}
    assert ok(f"Checks.Status {op}", entry) is False
    assert ok('"x" in Checks.Status', entry) is False
    assert ok('"x" not in Checks.Status', entry) is False


def test_lists_inside_lists_are_searched_at_every_level() -> None:
    obj = {"Groups": [{"Members": [{"Name": "a"}, {"Name": "b"}]}, {"Members": []}]}
    assert ok("Groups.Members.Name == b", obj) is True
    assert ok("Groups.Members.Name == c", obj) is False
    assert ok("Groups.1.Members is empty", obj) is True


def test_in_on_a_list_compares_each_element_in_its_own_type() -> None:
    obj = {"Mixed": ["a", 3, True, None, 2.5]}
    assert ok('"a" in Mixed', obj) is True
    assert ok("3 in Mixed", obj) is True
    assert ok('"3" in Mixed', obj) is True
    assert ok("true in Mixed", obj) is True
    assert ok("2.5 in Mixed", obj) is True
    assert ok("4 in Mixed", obj) is False


# -- missing data ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        ("== x", False),
        ("!= x", True),
        ("is empty", True),
        ("is not empty", False),
        ("contains x", False),
        ("not contains x", True),
        ('matches "."', False),
        ('not matches "."', True),
    ],
)
@pytest.mark.parametrize(
    "selector",
    [
        'Node.Meta["absent"]',  # missing map key (go-bexpr's NotPresentDisposition)
        "Service.NoSuchField",  # missing field: treated the same
        "Service.TaggedAddresses.lan",  # through a JSON null
        "Service.TaggedAddresses",  # a JSON null itself
        "Service.Port.Deeper",  # through a scalar
        "Nope.Nope.Nope",
    ],
)
def test_missing_data_is_not_present(selector: str, op: str, expected: bool) -> None:
    assert ok(f"{selector} {op}", HEALTH) is expected


def test_missing_data_with_in_form() -> None:
    assert ok('"x" in Service.Nothing', HEALTH) is False
    assert ok('"x" not in Service.Nothing', HEALTH) is True


# -- boolean structure -----------------------------------------------------------------


def test_precedence_not_over_and_over_or() -> None:
    f = compile_filter("a == 1 or not b == 2 and c == 3")
    assert f.ast == Or(
        (
            Match(("a",), Op.EQUAL, "1"),
            And((Not(Match(("b",), Op.EQUAL, "2")), Match(("c",), Op.EQUAL, "3"))),
        )
    )
    # and binds tighter than or: true because the right side of `or` is true
    assert ok("Service.Port == 1 and Service.Port == 2 or Service.Service == web", HEALTH)
    assert ok("Service.Service == web or Service.Port == 1 and Service.Port == 2", HEALTH)
    # parentheses override it
    assert not ok("Service.Service == web and (Service.Port == 1 or Service.Port == 2)", HEALTH)
    assert not ok("(Service.Service == web or Service.Port == 1) and Service.Port == 2", HEALTH)
    # not binds tighter than and/or
    assert ok("not Service.Service == db or Service.Port == 1", HEALTH)
    assert not ok("not (Service.Service == web or Service.Port == 1)", HEALTH)
    assert not ok("not Service.Service == web and Service.Port == 8080", HEALTH)


def test_parentheses_and_double_negation() -> None:
    assert ok("((Service.Port == 8080))", HEALTH)
    assert ok("( Service.Port == 8080 ) and ( Node.Node == `node-1` )", HEALTH)
    assert ok("not(Service.Port == 1)", HEALTH)  # go-bexpr wants a space; we accept it
    assert compile_filter("not not Service.Port == 8080").ast == Match(
        ("Service", "Port"), Op.EQUAL, "8080"
    )
    assert compile_filter("not not not a == 1").ast == Not(Match(("a",), Op.EQUAL, "1"))


def test_chains_are_flat_and_long_chains_evaluate() -> None:
    f = compile_filter(" or ".join(f"Service.Port == {n}" for n in range(2000)))
    assert isinstance(f.ast, Or) and len(f.ast.operands) == 2000
    assert f.matches({"Service": {"Port": 1999}})
    assert not f.matches({"Service": {"Port": 2000}})
    g = compile_filter(" and ".join("Service.Port != 1" for _ in range(2000)))
    assert g.matches(HEALTH)


def test_keywords_are_field_names_where_the_grammar_wants_a_selector() -> None:
    obj = {"not": "x", "in": ["a"], "is": "", "and": 1, "or": True}
    assert ok("not == x", obj)
    assert ok("not not == x", obj) is False
    assert ok('"a" in in', obj)
    assert ok("is is empty", obj)
    assert ok("and == 1 and or == true", obj)
    assert ok("not in in", {"in": ["not"]})  # the value `not` in the field `in`


def test_selector_forms() -> None:
    assert compile_filter('Node.Meta["some key"] == x').ast == Match(
        ("Node", "Meta", "some key"), Op.EQUAL, "x"
    )
    assert compile_filter('a["b"]["c.d"].e == 1').ast == Match(
        ("a", "b", "c.d", "e"), Op.EQUAL, "1"
    )
    # the quoted JSON-pointer selector, with ~1 for "/" and ~0 for "~"
    assert compile_filter('"/Node/Meta/a~1b~0c" == x').ast == Match(
        ("Node", "Meta", "a/b~c"), Op.EQUAL, "x"
    )
    assert ok('"/Node/Meta/env" == "prod"', HEALTH)
    assert ok('"/Service/Tags" contains v1', HEALTH)
    assert ok('"v1" in "/Service/Tags"', HEALTH)
    # a quoted value that looks like a pointer is still a value before `in`
    assert ok('"/x" in Path', {"Path": "/x/y"})
    # a bare value is the selector's text
    assert compile_filter("a == b.c").ast == Match(("a",), Op.EQUAL, "b.c")
    assert ok("Node.Datacenter == dc1", HEALTH)


def test_string_escapes_follow_go() -> None:
    obj = {"S": 'line\nnext\ttab é A "q" \\'}
    assert ok(r'S == "line\nnext\ttab \u00e9 \x41 \"q\" \\"', obj)
    assert ok(r'S == "line\nnext\ttab \xc3\xa9 \101 \"q\" \\"', obj)
    assert ok(r"S matches `\\$`", obj)  # raw strings keep backslashes
    assert ok('S contains "é"', obj)
    assert ok("R == `a\r\nb`", {"R": "a\nb"})  # raw strings drop \r, as Go does


def test_data_with_a_lone_surrogate_is_still_matched() -> None:
    obj = json.loads('{"S": "a\\ud800b"}')
    assert ok('S matches "^a.b$"', obj)
    assert ok('S contains "a"', obj)


def test_the_empty_expression_matches_everything() -> None:
    f = compile_filter("")
    assert f.matches(HEALTH) and f.matches({})
    assert f.select([HEALTH, CATALOG]) == [HEALTH, CATALOG]


def test_select_and_repr() -> None:
    catalog = [CATALOG, {**CATALOG, "ServiceName": "cache"}, {**CATALOG, "ServicePort": 1}]
    f = compile_filter('ServiceName == "db" and ServicePort == 5432')
    assert f.select(catalog) == [CATALOG]
    assert repr(f) == (
        "Filter('ServiceName == \"db\" and ServicePort == 5432', "
        "ast=ServiceName == `db` and ServicePort == `5432`)"
    )


@pytest.mark.parametrize(
    "expression",
    [
        'Service.Service == "web"',
        'not (a == 1 or b != "x y") and "v" in c.d',
        'Node.Meta["some key"] is not empty',
        'x matches "^a|b$" or y not matches `\\d`',
        "Checks.0.Status not contains ok",
        'S == "with `backtick`"',
    ],
)
def test_printed_ast_parses_back_to_itself(expression: str) -> None:
    ast = compile_filter(expression).ast
    assert compile_filter(str(ast)).ast == ast


# -- errors ----------------------------------------------------------------------------


def test_syntax_errors_say_where_and_what_was_expected() -> None:
    msg = error("Service.Service ==")
    assert msg == (
        "Failed to create boolean expression evaluator: 1:19 (18): no match found, "
        "expected: number, selector or string; found end of input"
    )
    msg = error("Service.Port = 5")
    assert msg.startswith("Failed to create boolean expression evaluator: 1:14 (13): ")
    assert '"=="' in msg
    msg = error("foo")
    assert "1:4 (3): no match found, expected: " in msg and '"=="' in msg and '"is"' in msg
    msg = error('"web" == Service')
    assert '1:7 (6): no match found, expected: "in" or "not in"' in msg
    msg = error("a == 1 b == 2")
    assert '1:8 (7): no match found, expected: "and", "or" or end of input' in msg
    assert "found 'b'" in msg
    assert '1:15 (14): no match found, expected: "empty" or "not"' in error("a == 1 or b is")
    assert 'expected: "empty";' in error("x is not")
    assert 'expected: "contains", "in" or "matches"' in error("x not equals y")


def test_error_positions_count_lines_and_bytes() -> None:
    msg = error('Service.Service == "web"\n  and\n  Node.Meta == == 1')
    assert "3:16 (46): no match found" in msg
    assert error("é == 1").startswith(
        "Failed to create boolean expression evaluator: 1:1 (0): unexpected character 'é'"
    )
    msg = error('a == "é" and')
    assert "1:13 (13): no match found" in msg  # column counts characters, offset bytes


@pytest.mark.parametrize(
    ("expression", "detail"),
    [
        ("", None),
        (" ", "1:2 (1): no match found"),
        ("(a == 1", "1:1 (0): unmatched parentheses"),
        ("(a == 1 b", '1:9 (8): no match found, expected: ")", "and" or "or"'),
        ("a == 1)", '1:7 (6): no match found, expected: "and", "or" or end of input'),
        ("a == 1e5", "invalid number literal '1e5'"),
        ("a == 01", "invalid number literal '01'"),
        ("a == 1.", "invalid number literal '1.'"),
        ("a == -", 'expected a digit after "-"'),
        ('a == "open', "1:6 (5): unterminated string literal"),
        ("a == `open", "1:6 (5): unterminated string literal"),
        ('a == "x\ny"', "newline in string literal"),
        (r'a == "\q"', r"invalid escape sequence \q"),
        (r'a == "\u12"', r"invalid escape sequence \u"),
        (r'a == "\ud800"', "invalid Unicode escape"),
        (r'a == "\400"', "invalid octal escape"),
        ('a matches "("', "invalid regular expression '(': missing )"),
        ('a matches "(?=x)"', "invalid regular expression"),  # RE2 has no lookahead
        ('a not matches "[z-a]"', "invalid regular expression"),
        (r"a matches `\1`", "invalid regular expression"),  # nor backreferences
        (r'a matches "\1"', "invalid octal escape"),  # a Go string's escape comes first
        ("a ! = 1", "unexpected character '!'"),
        ("a.b c", "1:5 (4): no match found"),
        ("a. b == 1", "1:3 (2): no match found, expected: digits or identifier; found whitespace"),
        ("a .b == 1", "1:3 (2): no match found"),
        ("a[0] == 1", "1:3 (2): no match found, expected: string"),
        ('a["b" == 1', '1:7 (6): no match found, expected: "]"'),
        ('"x" in "not a pointer"', 'invalid selector "not a pointer"'),
        ('"x" in 5', "no match found, expected: selector"),
        ("5 == a", '1:3 (2): no match found, expected: "in" or "not in"'),
        ("a ~ 1", "unexpected character '~'"),
        ("and", "1:4 (3): no match found"),
        ("a == 1 and", "1:11 (10): no match found"),
        ("not", "1:4 (3): no match found"),
        ("()", "1:2 (1): no match found"),
    ],
)
def test_malformed_expressions(expression: str, detail: str | None) -> None:
    if detail is None:
        assert compile_filter(expression).ast is None
        return
    msg = error(expression)
    assert msg.startswith("Failed to create boolean expression evaluator: ")
    assert detail in msg, msg


def test_nesting_is_bounded_not_a_crash() -> None:
    deep = "(" * (MAX_DEPTH - 1) + "a == 1" + ")" * (MAX_DEPTH - 1)
    assert compile_filter(deep).matches({"a": 1})
    assert f"nested deeper than {MAX_DEPTH}" in error("(" * 5000 + "a == 1" + ")" * 5000)
    assert f"nested deeper than {MAX_DEPTH}" in error("not " * 5000 + "a == 1")
    assert compile_filter("not " * (MAX_DEPTH - 2) + "a == 1").matches({"a": 1})


@pytest.mark.parametrize(
    ("expression", "detail"),
    [
        ('Service.Port == "abc"', "'Service.Port' holds a number, and 'abc' is not one"),
        ("Service.EnableTagOverride == yes", "holds a boolean, and 'yes' is not one"),
        ('Service.Tags == "v1"', "'Service.Tags' holds a list, which cannot be compared"),
        ("Service.Meta == x", "holds a map, which cannot be compared"),
        ('Service.Port matches "80"', "holds a number, which cannot be matched"),
        ("Service.Port is empty", "holds a number, which cannot be tested with is empty"),
        ('"8" in Service.Port', "holds a number, which cannot be searched"),
        ('"x" in Checks', "holds a list, which cannot be searched with in/contains (its elements"),
    ],
)
def test_values_the_field_cannot_take_are_errors(expression: str, detail: str) -> None:
    f = compile_filter(expression)  # the text is fine; the data decides
    with pytest.raises(BadRequestError) as info:
        f.matches(HEALTH)
    assert info.value.message.startswith("Failed to evaluate filter: ")
    assert detail in info.value.message
    assert info.value.status == 400


def test_a_catastrophic_pattern_runs_in_linear_time() -> None:
    f = compile_filter('Output matches "(a+)+$"')
    obj = {"Output": "a" * 100_000 + "b"}
    started = time.monotonic()
    assert f.matches(obj) is False
    # Python's backtracking `re` would take longer than the universe's age here.
    assert time.monotonic() - started < 5.0


# -- robustness ------------------------------------------------------------------------

_VOCABULARY = [
    "Service", "Service.Tags", "Checks.Status", 'Node.Meta["k"]', "a.0.b", "not", "and",
    "or", "in", "is", "empty", "contains", "matches", "==", "!=", "(", ")", "[", "]", ".",
    '"x"', "`y`", '"/Node/Meta/env"', "1", "-2.5", "0x10", "true", '"("', '"\\n"', '"\\',
    " ", " ", "\n", "\t", "é", "=", "!", "`", '"', "~", ",", "1e5", "01",
]  # fmt: skip

_VALID = [
    'Service.Service == "web" and not ("v1" in Service.Tags or Checks.Status != passing)',
    'ServiceMeta["some key"] matches `^w.*` or ServicePort == 5432',
    "Node.Meta is not empty and Checks.0.Status not contains crit",
    '"/Node/Meta/env" == prod or not not Service.Port != 80',
]


def _outcome(expression: str) -> Filter | None:
    try:
        f = compile_filter(expression)
    except BadRequestError as e:
        assert e.message.startswith("Failed to create boolean expression evaluator: "), e.message
        return None
    assert isinstance(f, Filter)
    for obj in (HEALTH, CATALOG, AGENT, {}):
        try:
            assert isinstance(f.matches(obj), bool)
        except BadRequestError as e:
            assert e.message.startswith("Failed to evaluate filter: ")
    return f


def test_fuzz_only_filters_or_bad_request_errors() -> None:
    rng = random.Random(20261128)
    compiled = 0
    for _ in range(2500):
        shape = rng.random()
        if shape < 0.45:
            words = [rng.choice(_VOCABULARY) for _ in range(rng.randint(1, 12))]
            expression = (" " if rng.random() < 0.7 else "").join(words)
        elif shape < 0.75:
            valid = rng.choice(_VALID)
            expression = valid[: rng.randint(0, len(valid))]
        elif shape < 0.9:
            chars = list(rng.choice(_VALID))
            for _ in range(rng.randint(1, 4)):
                chars[rng.randrange(len(chars))] = chr(rng.randint(0, 0x2FF))
            expression = "".join(chars)
        else:
            expression = "".join(chr(rng.randint(0, 0x7F)) for _ in range(rng.randint(0, 30)))
        if _outcome(expression) is not None:
            compiled += 1
    # the generator reaches both sides: the fuzz is not only exercising the error path
    assert 100 < compiled < 2400


def test_every_prefix_of_valid_expressions() -> None:
    for valid in _VALID:
        assert _outcome(valid) is not None
        for cut in range(len(valid)):
            _outcome(valid[:cut])
