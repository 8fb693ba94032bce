"""Read fhir-cdc events from Kafka with Confluent's own Python client (confluent-kafka).

Usage: confluent_consume.py BOOTSTRAP REGISTRY_URL FILE — FILE holds one message's
coordinates per line, `topic partition offset`. Each message is consumed from Kafka by
confluent-kafka's consumer and deserialized by its schema-registry AvroDeserializer (which
takes the Confluent wire format apart and fetches the writer schema from the registry
itself); the record is then turned into FHIR JSON by the rule the schemas document (see
avro_decode.py, whose conversion is shared). One JSON line per input line, in its order.
"""

import json
import sys

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from avro_decode import dump, named_types, to_json


def main():
    bootstrap, registry, path = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3]
    with open(path, encoding="utf-8") as lines:
        wanted = [(t, int(p), int(o)) for t, p, o in (line.split() for line in lines if line.strip())]
    ahead = {}
    for topic, partition, offset in wanted:
        ahead.setdefault((topic, partition), set()).add(offset)

    registry_client = SchemaRegistryClient({"url": registry})
    deserializer = AvroDeserializer(registry_client)
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": "fhir-cdc-confluent-oracle",
        "enable.auto.commit": False,
    })
    consumer.assign([TopicPartition(t, p, min(offsets)) for (t, p), offsets in ahead.items()])
    schemas, found = {}, {}
    while any(ahead.values()):
        message = consumer.poll(30)
        if message is None:
            sys.exit(f"timed out; still missing {sum(len(o) for o in ahead.values())} messages")
        if message.error():
            sys.exit(f"consuming failed: {message.error()}")
        place = (message.topic(), message.partition())
        if message.offset() not in ahead.get(place, ()):
            continue
        ahead[place].discard(message.offset())
        record = deserializer(message.value(), SerializationContext(message.topic(), MessageField.VALUE))
        schema_id = int.from_bytes(message.value()[1:5], "big")
        if schema_id not in schemas:
            raw = json.loads(registry_client.get_schema(schema_id).schema_str)
            names = {}
            named_types(raw, None, names)
            schemas[schema_id] = (raw, names)
        raw, names = schemas[schema_id]
        event = to_json(record, raw, raw.get("namespace"), names, None, False)
        if event["resource"] is not None:
            event["resource"] = {"resourceType": event["resource_type"], **event["resource"]}
        found[(*place, message.offset())] = dump({"schema_id": schema_id, "event": event})
    consumer.close()
    for coordinates in wanted:
        print(found[coordinates])


if __name__ == "__main__":
    main()
