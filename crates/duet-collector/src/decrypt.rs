//! The pure end of collection: a `Collection` in, the aggregate out.

use duet_core::hpke::{open, HpkeApplicationInfo, HpkeKeypair};
use duet_core::vdaf::Vdaf;
use duet_messages::dap09::{
    AggregateShareAad, BatchSelector, Collection, FixedSizeQuery, HpkeCiphertext,
    PartialBatchSelector, Query, Role, TaskId,
};
use duet_messages::Encode;

use crate::{CollectionResult, CollectorError};

/// The batch a collection is bound to: the queried interval for time_interval, the Leader's batch
/// ID for fixed_size (DAP-09 §4.6.4).
pub fn batch_selector(
    query: &Query,
    collection: &Collection,
) -> Result<BatchSelector, CollectorError> {
    match (query, collection.partial_batch_selector) {
        (Query::TimeInterval { batch_interval }, PartialBatchSelector::TimeInterval) => {
            Ok(BatchSelector::TimeInterval {
                batch_interval: *batch_interval,
            })
        }
        // A batch asked for by its ID must be the batch answered for.
        (
            Query::FixedSize {
                fixed_size_query: FixedSizeQuery::ByBatchId { batch_id: asked },
            },
            PartialBatchSelector::FixedSize(batch_id),
        ) if *asked != batch_id => Err(CollectorError::InvalidCollection(format!(
            "batch {asked:?} was asked for and batch {batch_id:?} answered"
        ))),
        (Query::FixedSize { .. }, PartialBatchSelector::FixedSize(batch_id)) => {
            Ok(BatchSelector::FixedSize { batch_id })
        }
        (query, selector) => Err(CollectorError::InvalidCollection(format!(
            "a {:?} query was answered with a {:?} batch selector",
            query.query_type(),
            selector.query_type()
        ))),
    }
}

/// Decrypts both aggregate shares of a `Collection` and unshards them.
pub fn decrypt_collection(
    task_id: &TaskId,
    keypair: &HpkeKeypair,
    vdaf: &Vdaf,
    query: &Query,
    collection: &Collection,
) -> Result<CollectionResult, CollectorError> {
    let batch_selector = batch_selector(query, collection)?;
    // What the result says must be about the batch asked for: a collection holds at least one
    // report (a batch holds at least `min_batch_size`), in the queried interval.
    if collection.report_count == 0 {
        return Err(CollectorError::InvalidCollection(
            "the Leader's result counts no report".into(),
        ));
    }
    if let Query::TimeInterval { batch_interval } = query {
        let within = collection.interval.start >= batch_interval.start
            && collection.interval.end() <= batch_interval.end();
        if !within {
            return Err(CollectorError::InvalidCollection(format!(
                "the Leader's result spans {:?}, outside the queried interval {:?}",
                collection.interval, batch_interval
            )));
        }
    }
    let aad = AggregateShareAad {
        task_id: *task_id,
        aggregation_parameter: vec![],
        batch_selector,
    }
    .get_encoded();
    let open_share = |server: Role, name: &str, ciphertext: &HpkeCiphertext| {
        open(
            keypair,
            &HpkeApplicationInfo::AggregateShare { server },
            ciphertext,
            &aad,
        )
        .map_err(|e| {
            // The config ID is not authenticated, so a mismatch is only a hint, not an error.
            let hint = if ciphertext.config_id == keypair.config.id {
                String::new()
            } else {
                format!(
                    " (it names HPKE config {}, the collector's is {})",
                    ciphertext.config_id, keypair.config.id
                )
            };
            CollectorError::Hpke(format!(
                "could not decrypt the {name}'s aggregate share{hint}: {e}"
            ))
        })
    };
    let leader = open_share(
        Role::Leader,
        "Leader",
        &collection.leader_encrypted_agg_share,
    )?;
    let helper = open_share(
        Role::Helper,
        "Helper",
        &collection.helper_encrypted_agg_share,
    )?;
    let aggregate = vdaf
        .unshard(&leader, &helper, collection.report_count)
        .map_err(|e| {
            CollectorError::Vdaf(format!("could not unshard the aggregate shares: {e}"))
        })?;
    Ok(CollectionResult {
        report_count: collection.report_count,
        interval: collection.interval,
        batch_id: match batch_selector {
            BatchSelector::FixedSize { batch_id } => Some(batch_id),
            BatchSelector::TimeInterval { .. } => None,
        },
        aggregate,
    })
}
