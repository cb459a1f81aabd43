//! State both roles keep: a task cache, the HPKE key ring and the process's metrics.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use duet_core::hpke::HpkeKeypair;
use duet_core::vdaf::{ShareLengths, Vdaf};
use duet_core::{Clock, Task};
use duet_messages::dap09::{HpkeConfigId, HpkeConfigList, TaskId};
use duet_messages::problem::DapProblemType;
use duet_store::{Datastore, StoreError};

use crate::config::AggregatorConfig;
use crate::error::Error;
use crate::metrics::Metrics;

/// The config ID of a role's first HPKE key.
const FIRST_CONFIG_ID: u8 = 1;

/// A task with its instantiated VDAF.
pub(crate) struct TaskEntry {
    pub task: Task,
    pub vdaf: Vdaf,
    /// The lengths of the VDAF's shares, which bound what an upload may carry.
    pub lengths: ShareLengths,
    /// The length of the VDAF's aggregate shares: what each time bucket of a job takes.
    pub aggregate_len: usize,
}

/// What every handler and driver of one role needs.
pub(crate) struct Shared {
    pub store: Arc<dyn Datastore>,
    pub clock: Arc<dyn Clock>,
    pub config: AggregatorConfig,
    pub metrics: Arc<Metrics>,
    tasks: RwLock<HashMap<TaskId, Arc<TaskEntry>>>,
    keys: RwLock<Arc<Vec<HpkeKeypair>>>,
}

impl Shared {
    /// Loads the role's HPKE keys, generating one if there is none.
    pub async fn new(
        store: Arc<dyn Datastore>,
        clock: Arc<dyn Clock>,
        config: AggregatorConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Error> {
        let keys = with_first_key(&*store, store.get_hpke_keypairs().await?).await?;
        Ok(Self {
            store,
            clock,
            config,
            metrics,
            tasks: RwLock::new(HashMap::new()),
            keys: RwLock::new(Arc::new(keys)),
        })
    }

    /// A task, from the cache or the store. Tasks never change once stored.
    pub async fn task(&self, id: &TaskId) -> Result<Option<Arc<TaskEntry>>, Error> {
        if let Some(e) = self.tasks.read().map_err(poisoned)?.get(id) {
            return Ok(Some(Arc::clone(e)));
        }
        let Some(task) = self.store.get_task(id).await? else {
            return Ok(None);
        };
        self.cache_task(task).map(Some)
    }

    /// Caches `task`, read from the store, with its instantiated VDAF; the entry already cached
    /// if there is one (tasks never change).
    pub fn cache_task(&self, task: Task) -> Result<Arc<TaskEntry>, Error> {
        if let Some(e) = self.tasks.read().map_err(poisoned)?.get(&task.id) {
            return Ok(Arc::clone(e));
        }
        let vdaf = task.vdaf.instantiate()?;
        let lengths = vdaf.share_lengths()?;
        let aggregate_len = vdaf.aggregate_len()?;
        let id = task.id;
        let entry = Arc::new(TaskEntry {
            task,
            vdaf,
            lengths,
            aggregate_len,
        });
        self.tasks
            .write()
            .map_err(poisoned)?
            .insert(id, Arc::clone(&entry));
        Ok(entry)
    }

    /// The tasks cached so far.
    pub fn cached_tasks(&self) -> Vec<Arc<TaskEntry>> {
        self.tasks
            .read()
            .map(|tasks| tasks.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A task, or the `unrecognizedTask` abort.
    pub async fn require_task(&self, id: &TaskId) -> Result<Arc<TaskEntry>, Error> {
        self.task(id).await?.ok_or_else(|| {
            Error::abort(DapProblemType::UnrecognizedTask, Some(*id), "no such task")
        })
    }

    /// The current keypairs.
    pub fn keys(&self) -> Arc<Vec<HpkeKeypair>> {
        self.keys.read().map(|k| Arc::clone(&k)).unwrap_or_default()
    }

    /// The published HPKE config list.
    pub fn hpke_config_list(&self) -> HpkeConfigList {
        HpkeConfigList(self.keys().iter().map(|k| k.config.clone()).collect())
    }
}

/// The role's key ring `keys` as read from the store, or, if it was empty, the ring once a first
/// key is stored. Every process's first key has one config ID: of replicas starting at once on
/// a new database, one stores its key and the others find the ID taken and read that key, so
/// they all decrypt with the same ring.
pub async fn with_first_key(
    store: &dyn Datastore,
    keys: Vec<HpkeKeypair>,
) -> Result<Vec<HpkeKeypair>, StoreError> {
    if !keys.is_empty() {
        return Ok(keys);
    }
    let kp = HpkeKeypair::generate(HpkeConfigId(FIRST_CONFIG_ID));
    match store.put_hpke_keypair(&kp).await {
        Ok(()) | Err(StoreError::AlreadyExists) => {}
        Err(e) => return Err(e),
    }
    store.get_hpke_keypairs().await
}

fn poisoned<T>(_: T) -> Error {
    Error::Internal("a lock was poisoned by a panic".into())
}

/// Finds the keypair for a config ID.
pub(crate) fn find_key(keys: &[HpkeKeypair], id: HpkeConfigId) -> Option<&HpkeKeypair> {
    keys.iter().find(|k| k.config.id == id)
}

#[cfg(test)]
mod tests {
    use duet_core::AggregatorRole;
    use duet_store::sqlite::SqliteDatastore;

    use super::*;

    /// A process that found no key while another stored its first one meanwhile ends up with
    /// the other's key ring: one key, the other's.
    #[tokio::test]
    async fn processes_starting_together_share_one_first_key() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let path = dir.path().join("keys.db");
        let store = SqliteDatastore::connect(&path.display().to_string())
            .await
            .expect("connect")
            .with_role(AggregatorRole::Helper);
        let other = with_first_key(&store, Vec::new()).await.expect("first");
        assert_eq!(other.len(), 1);
        let ours = with_first_key(&store, Vec::new()).await.expect("second");
        assert_eq!(ours.len(), 1);
        assert_eq!(ours[0].config, other[0].config);
        store.close().await;
    }
}
