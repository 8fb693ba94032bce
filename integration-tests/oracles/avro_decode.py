"""Decode fhir-cdc events with an independent Avro implementation (fastavro).

Usage: avro_decode.py REGISTRY_URL FILE — FILE holds one hex-encoded Kafka message value
per line. For each, the Confluent wire format is taken apart here (magic byte 0, 4-byte
big-endian schema id), the writer schema is fetched from the registry's Confluent API by
id, the body is decoded with fastavro, and the record is turned into FHIR JSON by the rule
the schemas document: absent (null) and empty elements are left out of the resource,
fields marked "fhirType": "decimal" become JSON numbers with their exact digits, the
resource gets its resourceType from the envelope. Times are printed as epoch microseconds.
One JSON line per message.
"""

import datetime
import decimal
import io
import json
import struct
import sys
import urllib.request

import fastavro

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def named_types(schema, namespace, found):
    """Every named record in a schema, by full name."""
    if isinstance(schema, list):
        for branch in schema:
            named_types(branch, namespace, found)
    elif isinstance(schema, dict):
        kind = schema.get("type")
        if kind in ("record", "enum", "fixed"):
            ns = schema.get("namespace", namespace)
            name = schema["name"] if "." in schema["name"] else f"{ns}.{schema['name']}" if ns else schema["name"]
            found[name] = schema
            for field in schema.get("fields", []):
                named_types(field["type"], ns, found)
        elif kind == "array":
            named_types(schema["items"], namespace, found)


def lookup(schema, namespace, names):
    if isinstance(schema, str) and schema not in ("null", "boolean", "int", "long", "string", "bytes", "float", "double"):
        return names.get(schema) or names[f"{namespace}.{schema}"]
    return schema


def to_json(value, schema, namespace, names, fhir_type, in_resource):
    schema = lookup(schema, namespace, names)
    if value is None:
        return None
    if isinstance(schema, list):
        branch = next(b for b in schema if b != "null")
        return to_json(value, branch, namespace, names, fhir_type, in_resource)
    if isinstance(schema, dict) and schema.get("type") == "array":
        return [to_json(v, schema["items"], namespace, names, fhir_type, in_resource) for v in value]
    if isinstance(schema, dict) and schema.get("type") == "record":
        ns = schema.get("namespace", namespace)
        out = {}
        for field in schema["fields"]:
            name = field["name"]
            converted = to_json(value.get(name), field["type"], ns, names, field.get("fhirType"), in_resource or name == "resource")
            if in_resource and (converted is None or converted == []):
                continue
            out[name] = converted
        return out
    if isinstance(value, datetime.datetime):
        return (value - EPOCH) // datetime.timedelta(microseconds=1)
    if fhir_type == "decimal":
        return decimal.Decimal(value)
    return value


def dump(value):
    """JSON text with decimals written digit for digit."""
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k) + ":" + dump(v) for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def main():
    registry, path = sys.argv[1].rstrip("/"), sys.argv[2]
    schemas = {}
    with open(path, encoding="ascii") as lines:
        for line in lines:
            message = bytes.fromhex(line.strip())
            magic, schema_id = struct.unpack(">bI", message[:5])
            assert magic == 0, "not the Confluent wire format"
            if schema_id not in schemas:
                with urllib.request.urlopen(f"{registry}/schemas/ids/{schema_id}") as response:
                    raw = json.loads(json.loads(response.read())["schema"])
                names = {}
                named_types(raw, None, names)
                schemas[schema_id] = (raw, fastavro.parse_schema(raw), names)
            raw, parsed, names = schemas[schema_id]
            record = fastavro.schemaless_reader(io.BytesIO(message[5:]), parsed)
            event = to_json(record, raw, raw.get("namespace"), names, None, False)
            if event["resource"] is not None:
                event["resource"] = {"resourceType": event["resource_type"], **event["resource"]}
            print(dump({"schema_id": schema_id, "event": event}))


if __name__ == "__main__":
    main()
