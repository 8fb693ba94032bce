//! The worklist: the drift `fhir-cdc reconcile --repair` cannot mend, per connector and
//! resource, for a person to decide on (`fhir-cdc reconcile worklist`). It lives in the
//! projection's database and schema, in a table of reconcile's own, created here.

use super::{Drifted, Report};
use crate::error::Error;

/// Create the worklist's table in `schema` if it is not there (idempotent; concurrent runs
/// serialize on an advisory lock). Databases whose projection created it keep theirs.
pub async fn migrate(client: &mut tokio_postgres::Client, schema: &str) -> Result<(), Error> {
    let fail = Error::while_::<tokio_postgres::Error>("creating the worklist");
    let tx = client.transaction().await.map_err(fail)?;
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(fail)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("{schema}.reconcile_worklist")],
    )
    .await
    .map_err(fail)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.reconcile_worklist (
           connector text NOT NULL, item text NOT NULL, class text NOT NULL,
           resource_type text NOT NULL, resource_id text NOT NULL,
           source_side text NOT NULL, log_side text NOT NULL, projection_side text NOT NULL,
           state text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'cleared', 'resolved')),
           first_seen timestamptz NOT NULL DEFAULT clock_timestamp(),
           last_seen timestamptz NOT NULL DEFAULT clock_timestamp(),
           first_run text NOT NULL, last_run text NOT NULL,
           resolved_at timestamptz, note text,
           PRIMARY KEY (connector, item));"
    ))
    .await
    .map_err(fail)?;
    tx.commit().await.map_err(fail)
}

/// Put the drift no path mends on the worklist: new items open, items seen again keep their
/// first sighting (and a resolution); items of this connector no longer drifting close.
pub async fn record(
    client: &tokio_postgres::Client,
    schema: &str,
    connector: &str,
    run_id: &str,
    report: &Report,
) -> Result<usize, Error> {
    let fail = Error::while_::<tokio_postgres::Error>("writing the worklist");
    let manual: Vec<&Drifted> = report.drifted.iter().filter(|d| d.class.manual()).collect();
    let items: Vec<String> = manual.iter().map(|d| item(d)).collect();
    for (drifted, item) in manual.iter().zip(&items) {
        let [source, log, projection] = drifted.sides();
        client
            .execute(
                &format!(
                    "INSERT INTO {schema}.reconcile_worklist
                       (connector, item, class, resource_type, resource_id, source_side, log_side,
                        projection_side, first_run, last_run)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
                     ON CONFLICT (connector, item) DO UPDATE SET
                       class = EXCLUDED.class, source_side = EXCLUDED.source_side,
                       log_side = EXCLUDED.log_side, projection_side = EXCLUDED.projection_side,
                       last_run = EXCLUDED.last_run, last_seen = clock_timestamp(),
                       state = CASE WHEN {schema}.reconcile_worklist.state = 'resolved'
                                    THEN 'resolved' ELSE 'open' END"
                ),
                &[
                    &connector,
                    item,
                    &drifted.class.name(),
                    &drifted.resource_type,
                    &drifted.resource_id,
                    &source,
                    &log,
                    &projection,
                    &run_id,
                ],
            )
            .await
            .map_err(fail)?;
    }
    client
        .execute(
            &format!(
                "UPDATE {schema}.reconcile_worklist SET state = 'cleared', last_run = $2
                  WHERE connector = $1 AND state = 'open' AND NOT item = ANY($3)"
            ),
            &[&connector, &run_id, &items],
        )
        .await
        .map_err(fail)?;
    Ok(items.len())
}

/// The open items of `connector` on the worklist.
pub async fn open_items(
    client: &tokio_postgres::Client,
    schema: &str,
    connector: &str,
) -> Result<i64, Error> {
    Ok(client
        .query_one(
            &format!("SELECT count(*) FROM {schema}.reconcile_worklist WHERE connector = $1 AND state = 'open'"),
            &[&connector],
        )
        .await
        .map_err(Error::while_("reading the worklist"))?
        .get(0))
}

/// A worklist item's name: the resource it is about.
fn item(drifted: &Drifted) -> String {
    format!("{}/{}", drifted.resource_type, drifted.resource_id)
}
