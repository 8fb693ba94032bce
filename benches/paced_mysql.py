"""Commit → Kafka latency of a MySQL/MariaDB connector at a steady rate (benches/mysql_pipeline.sh).

    paced_mysql.py MYSQL_URL TABLE FIRST_ID CHANGES_PER_S SECONDS BOOTSTRAP TOPIC

Updates 10 rows per transaction of TABLE (ids FIRST_ID on, each row once, so a message's key
names the transaction), CHANGES_PER_S / 10 transactions a second for SECONDS, noting when
each commit returned. The topic's messages are stamped by the broker as it appends them
(`message.timestamp.type = LogAppendTime`, set here); the latency of a change is that stamp
minus its commit's return. Prints one line: how many, p50 and p99 in ms.
"""

import re
import sys
import threading
import time
from urllib.parse import unquote, urlparse

import pymysql
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

url, table, first, rate, seconds, bootstrap, topic = sys.argv[1:8]
first, rate, seconds = int(first), int(rate), int(seconds)
transactions = rate // 10 * seconds

admin = AdminClient({"bootstrap.servers": bootstrap})
resource = ConfigResource("topic", topic, incremental_configs=[
    ConfigEntry("message.timestamp.type", "LogAppendTime",
                incremental_operation=AlterConfigOpType.SET)])
for future in admin.incremental_alter_configs([resource]).values():
    future.result()

consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"paced-{time.time()}",
                     "enable.auto.commit": False})
_, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
consumer.assign([TopicPartition(topic, 0, high)])

appended = {}


def consume():
    deadline = time.time() + seconds + 60
    while len(appended) < transactions * 10 and time.time() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        match = re.search(rb"(\d+)$", message.key() or b"")
        if match:
            appended.setdefault(int(match.group(1)), message.timestamp()[1] / 1000)


reader = threading.Thread(target=consume)
reader.start()

parsed = urlparse(url)
connection = pymysql.connect(host=parsed.hostname, port=parsed.port or 3306,
                             user=unquote(parsed.username), password=unquote(parsed.password or ""),
                             database=parsed.path.lstrip("/"), autocommit=True)
committed = {}
start = time.time()
with connection.cursor() as cursor:
    for i in range(transactions):
        pause = start + i * 10 / rate - time.time()
        if pause > 0:
            time.sleep(pause)
        low = first + i * 10
        cursor.execute(f"UPDATE {table} SET quantity = quantity + 1, version = version + 1 "
                       f"WHERE charge_id BETWEEN {low} AND {low + 9}")
        done = time.time()
        for charge in range(low, low + 10):
            committed[charge] = done
reader.join()
latencies = sorted(appended[c] - t for c, t in committed.items() if c in appended)
if len(latencies) < len(committed):
    print(f"only {len(latencies)} of {len(committed)} changes arrived", file=sys.stderr)
    sys.exit(1)
quantile = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
print(f"{len(latencies)} changes measured, p50 {quantile(0.5):.1f} ms, p99 {quantile(0.99):.1f} ms")
