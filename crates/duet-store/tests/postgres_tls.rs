//! Connections to PostgreSQL over TLS, as a database on another host needs: `sslmode` and
//! `sslrootcert` in the database URL, as libpq reads them.
//!
//! `scripts/test` starts its throwaway cluster with TLS on, under a certificate of a CA of its own,
//! and names that CA's certificate in `DUET_TEST_PG_CA`. Against a server of your own
//! (`DATABASE_URL` set), set `DUET_TEST_PG_CA` too, or this test prints why it is skipped.

use duet_store::conformance::postgres::database_url;
use duet_store::postgres::PostgresDatastore;
use duet_store::Datastore;
use sqlx::{Connection, PgConnection};

/// `url` with `params` added to its query.
fn with_params(url: &str, params: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{params}")
}

#[tokio::test]
async fn tls_connections_verify_the_server() {
    let Some(url) = database_url("tls_connections_verify_the_server") else {
        return;
    };
    let Ok(ca) = std::env::var("DUET_TEST_PG_CA") else {
        println!("skipping tls_connections_verify_the_server: DUET_TEST_PG_CA is not set");
        return;
    };
    let verified = with_params(&url, &format!("sslmode=verify-full&sslrootcert={ca}"));

    // A connection that checks the server's certificate against the CA is encrypted.
    let mut conn = PgConnection::connect(&verified)
        .await
        .expect("a TLS connection verified against the CA");
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_ssl");
    assert!(ssl, "the connection is not encrypted");
    conn.close().await.expect("close");

    // The store connects, migrates and works over it.
    let store = PostgresDatastore::connect(&verified)
        .await
        .expect("the store over TLS");
    store.health_check().await.expect("health check");
    store.close().await;

    // A server whose certificate no trusted CA signed is refused (here the built-in roots know
    // nothing of the test's CA), with a message that says so.
    let unverified = with_params(&url, "sslmode=verify-full");
    let e = PgConnection::connect(&unverified)
        .await
        .expect_err("an untrusted certificate");
    let text = e.to_string().to_lowercase();
    assert!(
        text.contains("certificate") || text.contains("issuer"),
        "{e}"
    );
}
