"""JSON <-> tensors for TF Serving's REST API, as tensorflow_serving/util/json_tensor.cc does it.

Requests: a body is parsed once (`parse_json_body`), then `json_feeds` reads a predict body's
row (`instances`) or columnar (`inputs`) format into arrays typed by the signature, and
`examples_input` a classify/regress body into an `Input` of `tf.Example`s; `{"b64": ...}`
inputs are decoded as leniently as absl::Base64Unescape. Replies: values are written as
json_tensor.cc writes them: floats by WriteDecimal (six significant digits when they read back
to the same value, else 9 for float32 and 17 for float64, whole numbers with ".0"), DT_STRING
outputs whose alias ends in `_bytes` as `{"b64": ...}` and every other string as a raw JSON
string (its bytes as they are, invalid UTF-8 included, as rapidjson writes them); errors as
`{"error": ...}` (MakeJsonFromStatus). No HTTP and no routing here.
"""

from __future__ import annotations

import base64
import json
import math
import re
from fractions import Fraction

import numpy as np
from tensorflow.core.example import example_pb2, feature_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import input_pb2

from serving import tensors
from serving.errors import invalid_argument


def error_json(message: str) -> bytes:
    """The `{"error": message}` body of a failed request, pretty-printed as rapidjson's PrettyWriter does."""
    return json.dumps({"error": message}, indent=2).encode("utf-8")


class JsonObject(dict):
    """A parsed JSON object as rapidjson holds one: a lookup finds the first member of a name
    (FindMember), and `members` keeps every (name, value) pair in order, repeated names included."""

    __slots__ = ("members",)


def _json_object(pairs: list) -> JsonObject:
    document = JsonObject()
    for name, value in pairs:
        document.setdefault(name, value)
    document.members = pairs
    return document


def _members(value: dict) -> list:
    """Every (name, value) of a parsed object, in order, repeated names included."""
    return getattr(value, "members", None) or list(value.items())


class _NumberTooBig(ValueError):
    def __init__(self, literal: str):
        super().__init__(literal)
        self.literal = literal


def _parse_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):  # rapidjson: kParseErrorNumberTooBig (Python would give inf)
        raise _NumberTooBig(literal)
    return value


def _parse_int(literal: str):
    """An integer rapidjson stores as one (int64 or uint64 range); a larger one as a double."""
    if len(literal) <= 20:
        value = int(literal)
        if -2**63 <= value < 2**64:
            return value
    return _parse_float(literal)


_DECODER = json.JSONDecoder(object_pairs_hook=_json_object, parse_float=_parse_float, parse_int=_parse_int)
_JSON_SPACE = " \t\n\r"
# What rapidjson's kParseNanAndInfFlag reads beyond Python's NaN, Infinity and -Infinity.
_MORE_NAN_INF = re.compile(r"-?Inf(?!inity)|-NaN")
_NAN_INF_OUTSIDE_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|(-?)(Infinity|Inf|NaN)')


def parse_json_body(body: bytes | None) -> dict:
    """The body as a JSON object, parsed as TF Serving's rapidjson flags parse it (ParseJson in
    json_tensor.cc): kParseStopWhenDoneFlag (text after the value is not read),
    kParseNanAndInfFlag (NaN, Inf, Infinity, with or without '-'), no UTF-8 validation (a
    string's bytes are kept as they are: decoded with "surrogateescape"), a number too big for a
    double refused, and every member of an object kept (JsonObject). Errors are
    INVALID_ARGUMENT naming the problem and its offset, never Python's codec or recursion
    internals."""
    if not body:
        raise invalid_argument("JSON Parse error: The document is empty")
    text = body.decode("utf-8", "surrogateescape")
    start = 1 if text.startswith("\ufeff") else 0  # EncodedInputStream<UTF8> skips a byte order mark
    start += len(text) - start - len(text[start:].lstrip(_JSON_SPACE))
    if start == len(text):
        raise invalid_argument(f"JSON Parse error: The document is empty. at offset: {start}")
    try:
        try:
            document, _end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError as error:
            if not _MORE_NAN_INF.match(text, error.pos):
                raise
            document, _end = _DECODER.raw_decode(_standard_nan_inf(text), start)
    except json.JSONDecodeError as error:
        raise invalid_argument(f"JSON Parse error: {error.msg} at offset: {error.pos}") from None
    except _NumberTooBig as error:
        raise invalid_argument(f"JSON Parse error: Number too big to be stored in double. at offset: "
                               f"{max(0, text.find(error.literal, start))}") from None
    except (ValueError, RecursionError):
        raise invalid_argument("JSON Parse error: malformed, nested too deeply or a number too long") from None
    if not isinstance(document, dict):
        raise invalid_argument(f"JSON Value: {_json_preview(document)} Is not object")
    return document


def _standard_nan_inf(text: str) -> str:
    """`text` with rapidjson's Inf, -Inf and -NaN (outside strings) spelt as Python's json reads them."""
    def spell(match):
        sign, word = match.group(1), match.group(2)
        if word is None:
            return match.group(0)  # a string: as it is
        return "NaN" if word == "NaN" else f"{sign}Infinity"
    return _NAN_INF_OUTSIDE_STRINGS.sub(spell, text)


# ---------------- JSON -> tensors ----------------
def json_feeds(document: dict, signature) -> tuple[bool, dict]:
    """(row_format, alias -> array) from a predict body, typed by the signature's dtypes."""
    has_instances, has_inputs = "instances" in document, "inputs" in document
    if has_instances == has_inputs:
        raise invalid_argument(
            "JSON Value: request must have exactly one of 'instances' (row format) or 'inputs' (columnar format)")
    aliases = sorted(signature.inputs)
    if has_instances:
        instances = document["instances"]
        if not isinstance(instances, list) or not instances:
            raise invalid_argument("'instances' must be a non-empty JSON list")
        if len(aliases) == 1 and not _is_named_object(instances[0]):
            return True, {aliases[0]: json_to_array(instances, signature.inputs[aliases[0]].dtype, aliases[0])}
        columns: dict[str, list] = {}
        for index, instance in enumerate(instances):
            if not _is_named_object(instance):
                raise invalid_argument(f"Expecting object but got {_json_type(instance)} at item {index} "
                                       "of input list")
            if len(_members(instance)) != len(instance):
                # TF would add the repeated input's values twice over, mixing rows: refused here.
                raise invalid_argument(f"Failed to process element: {index} of 'instances' list. JSON object: "
                                       f"{_json_preview(instance)} names an input more than once")
            for key, value in instance.items():
                if key not in signature.inputs:
                    raise invalid_argument(f"Failed to process element: {index} key: {key} of 'instances' "
                                           f"list. Error: JSON object: does not have named input: {key}")
                columns.setdefault(key, []).append(value)
            if set(instance) != set(aliases):
                raise invalid_argument(f"Failed to process element: {index} of 'instances' list. JSON object: "
                                       f"{_json_preview(instance)} keys must be equal to: {','.join(aliases)}")
        return True, _typed_columns(columns, signature)
    inputs = document["inputs"]
    if _is_named_object(inputs):
        # TF looks up each signature input and ignores any other key (FillTensorMapFromInputsMap).
        missing = [alias for alias in aliases if alias not in inputs]
        if missing:
            raise invalid_argument(f"Missing named input: {missing[0]} in 'inputs' object.")
        return False, _typed_columns({alias: inputs[alias] for alias in aliases}, signature)
    if len(aliases) != 1:
        raise invalid_argument("'inputs' must be an object of named tensors for a signature with several inputs")
    return False, {aliases[0]: json_to_array(inputs, signature.inputs[aliases[0]].dtype, aliases[0])}


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = ((bool, "boolean"), (dict, "object"), (list, "list"), (str, "string"), (int, "number"),
             (float, "number"))
    return next((name for kind, name in names if isinstance(value, kind)), "null")


def _json_preview(value) -> str:
    """The start of a value's JSON text for an error message.

    Cheap for huge values, and safe for deeply nested ones, whose json.dumps would raise
    RecursionError and turn a client mistake into a 500.
    """
    if isinstance(value, str):
        value = value[:100]
    elif isinstance(value, (dict, list)) and len(value) > 10:
        return f"(a {_json_type(value)} of {len(value)} items)"
    try:
        return json.dumps(value)[:100]
    except (RecursionError, ValueError):
        return f"(a deeply nested {_json_type(value)})"


def _is_named_object(value) -> bool:
    """An object of named inputs: any object but a base64 value (IsElementObject)."""
    return isinstance(value, dict) and not _is_base64_object(value)


def _is_base64_object(value) -> bool:
    """IsValBase64Object: an object whose one member is "b64", a string."""
    return (isinstance(value, dict) and len(_members(value)) == 1 and isinstance(value.get("b64"), str))


def _typed_columns(columns: dict, signature) -> dict:
    """alias -> array for columns whose aliases are all signature inputs."""
    return {alias: json_to_array(value, signature.inputs[alias].dtype, alias) for alias, value in columns.items()}


def json_to_array(value, dtype_enum: int, alias: str) -> np.ndarray:
    np_dtype = tensors.numpy_dtype(dtype_enum)
    try:
        if dtype_enum == types_pb2.DT_STRING:
            leaves = _map_leaves(value, lambda leaf: _string_leaf(leaf, alias))
            array = np.array(leaves, dtype=object)
            if array.dtype != object or any(not isinstance(v, bytes) for v in array.reshape(-1)):
                raise ValueError("ragged")
            return array
        _check_numeric_leaves(value, dtype_enum, alias)
        return np.array(value, dtype=np_dtype)
    except OverflowError:
        raise invalid_argument(f"Failed to process element: {alias}: a value is out of range for "
                               f"{tensors.dtype_name(dtype_enum)}") from None
    except (ValueError, TypeError):
        raise invalid_argument(
            f"Failed to process element: {alias}: expected a rectangular list of "
            f"{tensors.dtype_name(dtype_enum)} values") from None
    except RecursionError:
        raise invalid_argument(f"Failed to process element: {alias}: nested too deeply") from None


def _map_leaves(value, convert):
    if isinstance(value, list):
        return [_map_leaves(item, convert) for item in value]
    return convert(value)


def _string_leaf(leaf, alias: str) -> bytes:
    if isinstance(leaf, str):
        return _string_bytes(leaf)
    if _is_base64_object(leaf):
        decoded = base64_unescape(leaf["b64"])
        if decoded is None:
            raise invalid_argument(f"Unable to base64 decode value for {alias}")
        return decoded
    raise invalid_argument(f"JSON Value: {_json_preview(leaf)} Type: not a string, is not of expected type: string")


def _string_bytes(text: str) -> bytes:
    """A parsed JSON string's bytes: the body's own bytes, invalid UTF-8 included, as rapidjson
    keeps them. A lone surrogate written as an escape (\\ud800) has no bytes: rapidjson refuses it."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise invalid_argument("JSON Parse error: The surrogate pair in string is invalid.") from None


_ASCII_SPACE = {ord(character): None for character in " \t\n\v\f\r"}  # absl::ascii_isspace
_BASE64_DIGITS = re.compile(r"[A-Za-z0-9+/]*")
_PADDING_NEEDED = {0: 0, 2: 2, 3: 1}  # '=' that complete a final group of 4, 2 or 3 digits


def base64_unescape(text: str) -> bytes | None:
    """Bytes of base64 `text` as absl::Base64Unescape decodes them, or None where it fails.

    Like absl (escaping.cc Base64UnescapeInternal): ASCII whitespace anywhere is skipped, so
    the `base64` command's 76-column lines decode; padding may be left out, but when present
    it must complete the last group exactly ("AA==" or "AA", not "AA="); '.' pads like '=';
    only the standard alphabet counts (no '-' or '_'); nothing but padding and whitespace may
    follow the first pad; one lone digit in the last group fails; unused low bits are ignored.
    """
    compact = text.translate(_ASCII_SPACE)
    cut = min((index for index in (compact.find("="), compact.find(".")) if index >= 0), default=len(compact))
    digits, padding = compact[:cut], compact[cut:]
    if not _BASE64_DIGITS.fullmatch(digits) or padding.strip("=."):
        return None
    remainder = len(digits) % 4
    if remainder == 1 or (padding and len(padding) != _PADDING_NEEDED[remainder]):
        return None
    return base64.b64decode(digits + "=" * _PADDING_NEEDED[remainder])


def _check_numeric_leaves(value, dtype_enum: int, alias: str) -> None:
    if isinstance(value, list):
        for item in value:
            _check_numeric_leaves(item, dtype_enum, alias)
        return
    is_bool = isinstance(value, bool)
    if dtype_enum == types_pb2.DT_BOOL:
        ok = is_bool
    elif dtype_enum in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_HALF, types_pb2.DT_BFLOAT16):
        ok = isinstance(value, (int, float)) and not is_bool
    else:
        ok = isinstance(value, int) and not is_bool
    if not ok:
        expected = tensors.dtype_name(dtype_enum)[3:].lower()
        raise invalid_argument(f"JSON Value: {_json_preview(value)} is not of expected type: {expected}")


def examples_input(document: dict) -> input_pb2.Input:
    """An Input of tf.Examples from a classify/regress body (FillClassifyRegressRequestFromJson)."""
    model_input = input_pb2.Input()
    if "context" in document:
        with_context = model_input.example_list_with_context
        with_context.context.CopyFrom(json_example(document["context"]))
        target = with_context.examples
    else:
        target = model_input.example_list.examples
    examples = document.get("examples")
    if examples is None and "examples" not in document:
        raise invalid_argument(f"JSON Value: {_json_preview(document)} When method is classify, key 'examples' is "
                               "expected and was not found")
    if not isinstance(examples, list):
        raise invalid_argument(f"JSON Value: {_json_preview(document)} Expecting 'examples' value to be an list/array")
    if not examples:
        raise invalid_argument(f"JSON Value: {_json_preview(document)} 'examples' value is an empty array")
    for item in examples:
        target.add().CopyFrom(json_example(item))
    return model_input


# rapidjson's type names (JsonTypeString in json_tensor.cc).
def _rapidjson_type(value) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    names = ((dict, "Object"), (list, "Array"), (str, "String"))
    return next((name for kind, name in names if isinstance(value, kind)), "Number")


def json_example(item) -> example_pb2.Example:
    """MakeExampleFromJsonObject: a feature per member (a repeated name: the last one counts)."""
    if not isinstance(item, dict):
        raise invalid_argument(f"Example must be JSON object but got JSON {_rapidjson_type(item)}")
    example = example_pb2.Example()
    for name, content in _members(item):
        feature = feature_pb2.Feature()
        for value in content if isinstance(content, list) else [content]:
            _add_value_to_feature(value, name, feature)
        example.features.feature[name].CopyFrom(feature)
    return example


_FEATURE_KIND_NAMES = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64", None: "UNKNOWN"}


def _add_value_to_feature(value, name: str, feature: feature_pb2.Feature) -> None:
    """AddValueToFeature: one JSON value into a Feature, whose kind the first value sets.

    Numbers written with a fraction or exponent (or too large for 64 bits) are floats; other
    numbers int64, and one in uint64's range only is refused, as TF Serving refuses it.
    """
    def values_of(kind: str):
        current = feature.WhichOneof("kind")
        if current not in (None, kind):
            raise invalid_argument(f"Unexpected element type in feature: {name} expecting type: "
                                   f"{_FEATURE_KIND_NAMES[current]}")
        return getattr(feature, kind).value

    if value is None or isinstance(value, list) or (isinstance(value, dict) and not _is_base64_object(value)):
        raise invalid_argument(f"Feature: {name} has element with unexpected JSON type: {_rapidjson_type(value)}")
    if isinstance(value, bool):
        values_of("int64_list").append(1 if value else 0)
    elif isinstance(value, dict):
        decoded = base64_unescape(value["b64"])
        if decoded is None:
            raise invalid_argument("Unable to base64 decode")
        values_of("bytes_list").append(decoded)
    elif isinstance(value, str):
        values_of("bytes_list").append(_string_bytes(value))
    elif isinstance(value, float):
        values_of("float_list").append(value)
    elif value >= 2**63:
        values_of("int64_list")  # the kind is checked first, as in TF
        raise invalid_argument(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
    else:
        values_of("int64_list").append(value)


# ---------------- tensors -> JSON ----------------
def predictions_json(outputs: dict, row_format: bool) -> str:
    """The `predictions` (row) or `outputs` (columnar) document of MakeJsonFromTensors.

    The text may hold lone surrogates standing for raw bytes of string outputs; encode it
    with "surrogateescape" to get the bytes TF Serving would send.
    """
    aliases = sorted(outputs)
    if row_format:
        if len(aliases) == 1:
            return '{"predictions": ' + array_json(outputs[aliases[0]], aliases[0]) + "}"
        sizes = {outputs[a].shape[0] if outputs[a].ndim else None for a in aliases}
        if len(sizes) != 1 or None in sizes:
            raise invalid_argument("Output tensors must have the same 0th dimension for row format")
        rows = []
        for index in range(sizes.pop()):
            fields = [_string_text(a.encode()) + ": " + array_json(outputs[a][index], a) for a in aliases]
            rows.append("{" + ", ".join(fields) + "}")
        return '{"predictions": [' + ", ".join(rows) + "]}"
    if len(aliases) == 1:
        return '{"outputs": ' + array_json(outputs[aliases[0]], aliases[0]) + "}"
    fields = [_string_text(a.encode()) + ": " + array_json(outputs[a], a) for a in aliases]
    return '{"outputs": {' + ", ".join(fields) + "}}"


def classify_json(result) -> str:
    """MakeJsonFromClassificationResult: [[[label, score], ...], ...], scores by WriteDecimal."""
    items = []
    for item in result.classifications:
        scores = float_texts(np.array([c.score for c in item.classes], np.float32))
        pairs = ["[" + _string_text(c.label.encode()) + ", " + score + "]" for c, score in zip(item.classes, scores)]
        items.append("[" + ", ".join(pairs) + "]")
    return '{"results": [' + ", ".join(items) + "]}"


def regress_json(result) -> str:
    """MakeJsonFromRegressionResult: [value, ...], by WriteDecimal."""
    values = float_texts(np.array([item.value for item in result.regressions], np.float32))
    return '{"results": [' + ", ".join(values) + "]}"


def array_json(array: np.ndarray, alias: str) -> str:
    """Nested JSON list text for an array (a bare value for a scalar)."""
    array = np.asarray(array)
    if array.size == 0:
        return json.dumps(np.zeros(array.shape).tolist())
    texts = _leaf_texts(array.reshape(-1), alias)
    for size in reversed(array.shape):
        texts = ["[" + ",".join(texts[i:i + size]) + "]" for i in range(0, len(texts), size)]
    return texts[0]


def _leaf_texts(flat: np.ndarray, alias: str) -> list[str]:
    """JSON text of each value of a 1-D array, as json_tensor.cc's AddSingleValueAndAdvance."""
    dtype = flat.dtype
    if dtype == object or dtype.kind == "S":
        # IsNamedTensorBytes: base64 exactly for aliases ending in "_bytes", raw strings otherwise.
        write = _base64_text if alias.endswith("_bytes") else _string_text
        return [write(tensors.as_bytes(value)) for value in flat]
    if dtype == np.bool_:
        return ["true" if value else "false" for value in flat.tolist()]
    if dtype.kind in "iu":
        return [str(value) for value in flat.tolist()]
    if dtype in (np.float16, np.float32, np.float64):
        return float_texts(flat)
    return [json.dumps(str(value)) for value in flat]


def float_texts(flat: np.ndarray) -> list[str]:
    """WriteDecimal (json_tensor.cc) of each value of a 1-D float16/32/64 array.

    absl::StrCat's six significant digits (printf "%g") when that text reads back (strtof /
    strtod) to the same value, else "%.9g" for float32 (float16 is widened to float32 first,
    as TF does) or "%.17g" for float64; ".0" is added to text with neither '.' nor 'e';
    NaN, Infinity and -Infinity as such. Vectorised: one "%g" and one parse per value, with
    the rare values whose six digits do not round-trip redone one by one.
    """
    is_double = flat.dtype == np.float64
    with np.errstate(invalid="ignore", over="ignore"):  # signalling NaNs and overflow are handled below
        values = flat.astype(np.float64 if is_double else np.float32)
        wide = values.astype(np.float64)
        texts = ["%g" % value for value in wide.tolist()]
        parsed = np.array(texts, dtype=np.float64)  # strtod of each text ("nan"/"inf" included)
        same = parsed == wide if is_double else _reads_back_as_float32(texts, parsed, values)
    finite = np.isfinite(wide)
    precise = "%.17g" if is_double else "%.9g"
    for index in np.flatnonzero(finite & ~same).tolist():
        texts[index] = precise % wide[index]
    texts = [text if ("." in text or "e" in text) else text + ".0" for text in texts]
    for index in np.flatnonzero(~finite).tolist():
        value = wide[index]
        texts[index] = "NaN" if np.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return texts


def _reads_back_as_float32(texts: list[str], parsed: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Whether strtof(text) == value, from strtod's double of each text.

    Rounding the double to float32 equals strtof except when the double falls exactly halfway
    between two float32 values (double rounding); those rare texts are decided exactly.
    """
    rounded = parsed.astype(np.float32)
    same = rounded == values
    neighbour = np.nextafter(rounded, np.where(parsed > rounded, np.float32(np.inf), np.float32(-np.inf)))
    halfway = np.isfinite(parsed) & (2 * parsed == rounded.astype(np.float64) + neighbour.astype(np.float64))
    for index in np.flatnonzero(halfway).tolist():
        exact, double = Fraction(texts[index]), Fraction(float(parsed[index]))
        if exact != double:  # the text lies off the midpoint, on the side strtof rounds to
            below, above = sorted((float(rounded[index]), float(neighbour[index])))
            same[index] = (above if exact > double else below) == float(values[index])
    return same


# rapidjson's Writer::WriteString: '"', '\\' and control bytes escaped, every other byte as it is.
_JSON_ESCAPES = {code: "\\u%04X" % code for code in range(0x20)}
_JSON_ESCAPES.update({0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r",
                      ord('"'): '\\"', ord("\\"): "\\\\"})


def _string_text(value: bytes) -> str:
    """A DT_STRING value as a raw JSON string, as TF Serving's rapidjson writer sends it.

    rapidjson copies the bytes without checking UTF-8, so a value that is not UTF-8 reaches
    the client as those very bytes (a body that is then not valid UTF-8 JSON). They travel
    here as lone surrogates ("surrogateescape") until the reply is encoded.
    """
    return '"' + value.decode("utf-8", "surrogateescape").translate(_JSON_ESCAPES) + '"'


def _base64_text(value: bytes) -> str:
    return '{"b64": "' + base64.b64encode(value).decode("ascii") + '"}'
