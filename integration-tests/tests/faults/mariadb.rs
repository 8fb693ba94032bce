//! The same faults against a MariaDB source, and the server itself stopped: the broker
//! frozen for 30 s, the registry frozen for 30 s while the connector has to start again,
//! MariaDB shut down cleanly and started again, MariaDB killed. Each time `run` must not
//! exit, and every charge in the table at the end must arrive with its latest amount as the
//! latest version of its ChargeItem, repeats only as exact events. The outages must show
//! while they last: the source lag grows, and a stall is warned of and its end logged.

use std::{future::Future, time::Duration};

use integration_tests::{
    connector::{
        assert_repeats_are_exact, await_binlog_stored, await_snapshotted, events_of, free_port,
        latest_values, start, stop, try_scrape,
    },
    stack,
};
use mysql_async::{prelude::Queryable, TxOpts};
use tokio_util::sync::CancellationToken;

use super::{fault, ONE_AT_A_TIME};

/// What a fault run showed: the connector's log, and the highest source lag it reported.
struct Survived {
    log: String,
    peak_lag_ms: f64,
}

/// Charges the table holds before the connector starts (its snapshot).
const SNAPSHOT: u64 = 500;

/// Run a connector over the sample charge table written to all along (ten new charges and
/// one raised amount per transaction, every 20 ms, and once a 5,000-row transaction), apply
/// `fault` meanwhile, then account for every charge by its latest amount.
async fn survives(name: &str, fault: impl Future<Output = ()>) -> Survived {
    let _alone = ONE_AT_A_TIME.lock().await;
    let name = stack::unique(name);
    let dir = std::env::temp_dir().join(&name);
    let mut conn = stack::mysql_conn().await;
    let database = stack::billing_tables(&mut conn, &name, &dir.join("mappings")).await;
    let charge = format!("{database}.{name}_charge");
    let insert = {
        let charge = charge.clone();
        move |from: u64, to: u64| {
            format!(
            "INSERT INTO {charge} (charge_id, account_no, mrn, cpt_code, amount, status, service_date, posted_at)
             SELECT seq, 'ACC-1', 'M000000001', '99213', 100.00, 'B', '2024-03-05', '2024-03-05 09:15:00'
               FROM seq_{from}_to_{to}"
            )
        }
    };
    conn.query_drop(insert(1, SNAPSHOT)).await.unwrap();
    let prefix = stack::unique("fhirmyfault");
    let config = stack::mysql_connector_config(&dir, &name, &prefix);
    let port = free_port();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[health]\nstall_after_seconds = 5\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    ));
    std::fs::write(&config, text).unwrap();
    let (log, topic) = (dir.join("run.log"), format!("{prefix}.billing.ChargeItem"));
    let mut connector = start(&config, &log);
    await_snapshotted(&config, &log).await;

    // Each transaction tried once, on a new connection after a failure: whatever is in the
    // table at the end was committed.
    let writing = CancellationToken::new();
    let writer = {
        let writing = writing.clone();
        let (charge, insert) = (charge.clone(), insert.clone());
        tokio::spawn(async move {
            let mut conn = stack::mysql_conn().await;
            let mut n: u64 = 0;
            while !writing.is_cancelled() {
                let (from, to) = match n {
                    150 => (100_000, 104_999),
                    _ => (SNAPSHOT + 1 + n * 10, SNAPSHOT + 10 + n * 10),
                };
                let raise = format!(
                    "UPDATE {charge} SET amount = amount + 1, version = version + 1 WHERE charge_id = {}",
                    n * 7 % SNAPSHOT + 1
                );
                let written = async {
                    let mut tx = conn.start_transaction(TxOpts::default()).await?;
                    tx.query_drop(insert(from, to)).await?;
                    tx.query_drop(raise).await?;
                    tx.commit().await
                };
                n += 1;
                if written.await.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    if let Ok(Ok(fresh)) = tokio::time::timeout(
                        Duration::from_secs(5),
                        mysql_async::Conn::new(
                            mysql_async::Opts::from_url(&stack::mysql_url()).unwrap(),
                        ),
                    )
                    .await
                    {
                        conn = fresh;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // The source lag, once a second, while the fault lasts.
    let watching = CancellationToken::new();
    let watcher = {
        let watching = watching.clone();
        tokio::spawn(async move {
            let mut peak: f64 = 0.0;
            while !watching.is_cancelled() {
                // Nothing answers once `run` has exited, which the test reports.
                let Ok(Ok(samples)) = tokio::task::spawn_blocking(move || try_scrape(port)).await
                else {
                    break;
                };
                let lag = samples
                    .into_iter()
                    .find(|(name, _)| name.starts_with("fhir_cdc_source_lag_milliseconds"))
                    .map_or(0.0, |(_, value)| value);
                peak = peak.max(lag);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            peak
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    fault.await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    writing.cancel();
    writer.await.unwrap();
    watching.cancel();
    let peak_lag_ms = watcher.await.unwrap();

    let mut conn = stack::mysql_conn().await;
    let expected = stack::charge_amounts(&mut conn, &charge).await;
    assert!(
        connector.running(),
        "`run` exited during the fault; log:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    await_binlog_stored(&config, Duration::from_secs(180), &log).await;
    let events = events_of(&topic).await;
    let latest = latest_values(&events, "/priceOverride/value");
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(id, amount)| latest.get(*id) != Some(*amount))
        .map(|(id, amount)| (id, amount, latest.get(id)))
        .collect();
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        wrong.is_empty() && latest.len() == expected.len(),
        "{} of {} charges missing or stale, e.g. {:?}; log:\n{log_text}",
        wrong.len(),
        expected.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_repeats_are_exact(&events);
    eprintln!(
        "{name}: {} charges, {} events, peak source lag {:.1} s, {} restart(s)",
        expected.len(),
        events.len(),
        peak_lag_ms / 1000.0,
        log_text.matches("restarting").count() + log_text.matches("restarts by itself").count()
    );
    // Only a stop request ends `run` with 0.
    assert!(stop(connector).success(), "{log_text}");
    let _ = std::fs::remove_dir_all(dir);
    Survived {
        log: log_text,
        peak_lag_ms,
    }
}

/// A 30-second outage shown while it lasted: the source lag grew past 20 s, a stall was
/// warned of, naming `what`, and its end logged.
fn assert_outage_shown(survived: &Survived, what: &str) {
    assert!(
        survived.peak_lag_ms >= 20_000.0,
        "the source lag peaked at {} ms during a 30 s outage",
        survived.peak_lag_ms
    );
    let stall = survived
        .log
        .lines()
        .find(|l| l.contains("delivery has made no progress"))
        .unwrap_or_else(|| panic!("no stall warned of; log:\n{}", survived.log));
    assert!(stall.contains(what), "{stall}");
    assert!(
        survived.log.contains("delivery moves again"),
        "{}",
        survived.log
    );
}

#[tokio::test]
async fn mariadb_a_broker_frozen_for_30_s_loses_nothing_and_shows_while_it_lasts() {
    let survived = survives("my_brokerfault", async {
        fault(&["pause", "kafka"]);
        tokio::time::sleep(Duration::from_secs(30)).await;
        fault(&["resume", "kafka"]);
    })
    .await;
    assert_outage_shown(&survived, "Kafka");
}

/// The registry frozen, and the connector made to start again meanwhile (its binary log
/// connection killed): starting needs the registry, so it retries until it answers again.
#[tokio::test]
async fn mariadb_a_registry_frozen_for_30_s_while_the_connector_restarts_loses_nothing() {
    let survived = survives("my_registryfault", async {
        fault(&["pause", "registry"]);
        let mut conn = stack::mysql_conn().await;
        let dumps: Vec<u64> = conn
            .query(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'",
            )
            .await
            .unwrap();
        assert!(!dumps.is_empty(), "no binary log reader to end");
        for id in dumps {
            stack::mariadb_root(&format!("KILL CONNECTION {id}"));
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
        fault(&["resume", "registry"]);
    })
    .await;
    assert_outage_shown(&survived, "the schema registry");
}

/// A clean shutdown ends the binary log stream like an end of file: the connector waits
/// for the server and resumes, twice.
#[tokio::test]
async fn mariadb_shut_down_cleanly_and_started_again_loses_nothing_and_run_goes_on() {
    let survived = survives("my_restartfault", async {
        fault(&["restart", "mariadb"]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        fault(&["restart", "mariadb"]);
    })
    .await;
    assert!(
        survived.log.contains("restarts by itself"),
        "{}",
        survived.log
    );
}

#[tokio::test]
async fn mariadb_killed_and_recovered_loses_nothing_and_run_goes_on() {
    // The stack's server trades durability for speed (commits flushed about once a
    // second); killed so, it forgets commits its binary log, and so every replica, already
    // has. Durable commits until the kill; the restart restores the stack's settings.
    stack::mariadb_root(
        "SET GLOBAL innodb_flush_log_at_trx_commit = 1; SET GLOBAL sync_binlog = 1",
    );
    let survived = survives("my_killfault", async {
        fault(&["kill", "mariadb"]);
    })
    .await;
    assert!(
        survived.log.contains("restarts by itself"),
        "{}",
        survived.log
    );
}
