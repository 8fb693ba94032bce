"""Wait until the topics matching a regex hold COUNT messages in all (benches/debezium.sh).

    await_topic.py BOOTSTRAP TOPIC_REGEX COUNT TIMEOUT_S

Polls the partitions' high watermarks every 20 ms (topics may not exist yet); exits 0 once
they add up to COUNT or more, printing when the first message after its start arrived (Unix
time: a connector's start-up ends there), 1 on timeout with what it saw.
"""

import re
import sys
import time

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka import Consumer

bootstrap, pattern, count, timeout = sys.argv[1], re.compile(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
admin = AdminClient({"bootstrap.servers": bootstrap})
consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "await-topic"})
deadline = time.time() + timeout
seen, partitions, listed = 0, [], 0.0
initial, first = None, None
while time.time() < deadline:
    if time.time() - listed > 0.5:
        metadata = admin.list_topics(timeout=5).topics
        partitions = [TopicPartition(t, p) for t, m in metadata.items() if pattern.fullmatch(t)
                      for p in m.partitions]
        listed = time.time()
    seen = sum(consumer.get_watermark_offsets(p, timeout=5)[1] for p in partitions)
    if initial is None:
        initial = seen
    elif first is None and seen > initial:
        first = time.time()
    if seen >= count:
        print(first or time.time())
        sys.exit(0)
    time.sleep(0.02)
print(f"{seen} of {count} messages after {timeout:.0f} s", file=sys.stderr)
sys.exit(1)
