"""Validate FHIR R4 resources with two independent implementations.

Usage: fhir_validate.py FILE — FILE holds one FHIR JSON resource per line. Prints one JSON
object per line: {"line": n, "fhirkit": [issues], "google": error-or-null}. The resource's
own text is handed to both validators, so decimals reach them with their exact digits.
"""

import importlib
import json
import re
import sys

import fhirkit
from google.fhir.r4 import json_format


def proto_class(resource_type):
    module = re.sub(r"(?<!^)(?=[A-Z])", "_", resource_type).lower()
    return getattr(importlib.import_module(f"google.fhir.r4.proto.core.resources.{module}_pb2"), resource_type)


def google_error(text, resource_type):
    try:
        json_format.json_fhir_string_to_proto(text, proto_class(resource_type), validate=True)
        return None
    except Exception as error:  # the validator's own error types vary
        return f"{type(error).__name__}: {error}"


def main():
    with open(sys.argv[1], encoding="utf-8") as lines:
        for n, text in enumerate(lines, 1):
            text = text.strip()
            resource_type = json.loads(text)["resourceType"]
            issues = [str(i) for i in fhirkit.validate(text) if i.severity == "error"]
            print(json.dumps({"line": n, "fhirkit": issues, "google": google_error(text, resource_type)}))


if __name__ == "__main__":
    main()
