//! Upload: strict checks, then a batching writer that stores many reports per transaction.

use std::sync::Arc;

use duet_core::vdaf::ShareLengths;
use duet_messages::dap09::{ReportRef, TaskId};
use duet_messages::problem::DapProblemType;
use duet_store::{Durable, NewReport};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::Leader;
use crate::batch::in_any;
use crate::error::Error;
use crate::metrics::StoreOp;
use crate::shared::{find_key, TaskEntry};

pub(crate) struct PendingUpload {
    report: NewReport,
    done: oneshot::Sender<Result<(), String>>,
    /// The report's share of the queue's bytes, given back when the writer takes the report
    /// into a batch.
    _queued: Option<OwnedSemaphorePermit>,
}

/// The uploads waiting for the report writer, bounded by count (`upload_queue_capacity`) and
/// by bytes (`upload_queue_bytes`, counted in whole KiB per report): a client that sends large
/// reports and hangs up before their answers cannot make the queue hold more than that.
pub(crate) struct UploadQueue {
    tx: mpsc::Sender<PendingUpload>,
    bytes: Arc<Semaphore>,
    kib: u32,
}

/// `bytes` in whole KiB, at least one (saturating at `u32::MAX`).
fn whole_kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl UploadQueue {
    /// A queue of up to `capacity` uploads and `bytes` bytes, and the writer's end of it.
    pub(crate) fn new(capacity: usize, bytes: usize) -> (Self, mpsc::Receiver<PendingUpload>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let kib = whole_kib(bytes).min(u32::try_from(Semaphore::MAX_PERMITS).unwrap_or(u32::MAX));
        let bytes = Arc::new(Semaphore::new(kib as usize));
        (UploadQueue { tx, bytes, kib }, rx)
    }

    /// Queues `report`; the receiver gets the writer's answer. [`Error::Overloaded`] if the
    /// queue is full by count or by bytes: a report longer than the whole byte budget goes in
    /// only when the queue holds no other bytes.
    fn push(&self, report: NewReport) -> Result<oneshot::Receiver<Result<(), String>>, Error> {
        let kib = whole_kib(report.encoded.len()).min(self.kib);
        let queued = Arc::clone(&self.bytes)
            .try_acquire_many_owned(kib)
            .map_err(|_| Error::Overloaded)?;
        let (done, wait) = oneshot::channel();
        let pending = PendingUpload {
            report,
            done,
            _queued: Some(queued),
        };
        self.tx.try_send(pending).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded,
            mpsc::error::TrySendError::Closed(_) => {
                Error::Internal("the report writer has stopped".into())
            }
        })?;
        Ok(wait)
    }
}

impl Leader {
    /// The task an upload is for (`unrecognizedTask` for a task this Leader does not have), and
    /// the longest body a report of it can be, so that a longer one is refused before it is read.
    pub(crate) async fn upload_limit(
        &self,
        task_id: TaskId,
    ) -> Result<(Arc<TaskEntry>, usize), Error> {
        let entry = self.shared.require_task(&task_id).await?;
        let limit = max_report_len(&entry.lengths);
        Ok((entry, limit))
    }

    /// Handles `PUT /tasks/{task_id}/reports`: validates the report and stores it durably before
    /// returning.
    pub async fn upload(&self, task_id: TaskId, body: &[u8]) -> Result<(), Error> {
        let entry = self.shared.require_task(&task_id).await?;
        self.upload_to(&entry, body).await
    }

    /// [`Leader::upload`] for a task already looked up.
    pub(crate) async fn upload_to(&self, entry: &TaskEntry, body: &[u8]) -> Result<(), Error> {
        let task = &entry.task;
        let task_id = task.id;
        // Checked in place: the body is stored as it came, so nothing needs copying out of it.
        let report = ReportRef::get_decoded(body).map_err(|e| {
            Error::abort(
                DapProblemType::InvalidMessage,
                Some(task_id),
                format!("malformed report: {e}"),
            )
        })?;
        check_lengths(&report, &entry.lengths).map_err(|detail| {
            Error::abort(DapProblemType::InvalidMessage, Some(task_id), detail)
        })?;
        let keys = self.shared.keys();
        if find_key(&keys, report.leader_encrypted_input_share.config_id).is_none() {
            return Err(Error::abort(
                DapProblemType::OutdatedConfig,
                Some(task_id),
                format!(
                    "unknown HPKE config ID {}",
                    report.leader_encrypted_input_share.config_id.0
                ),
            ));
        }
        let now = self.shared.clock.now();
        let t = report.metadata.time;
        // A time past 2^63 seconds is too far in the future whatever the task's clock skew (and
        // past what a store keeps: it would fail its write batch, with the uploads in it).
        if t.0 > now.0.saturating_add(task.tolerable_clock_skew.0) || i64::try_from(t.0).is_err() {
            return Err(Error::abort(
                DapProblemType::ReportTooEarly,
                Some(task_id),
                "report timestamp is too far in the future",
            ));
        }
        if task.task_expiration.is_some_and(|exp| t.0 > exp.0) {
            return Err(Error::abort(
                DapProblemType::ReportRejected,
                Some(task_id),
                "the task has expired",
            ));
        }
        if task
            .report_expiry_age
            .is_some_and(|age| t.0.saturating_add(age.0) < now.0)
        {
            return Err(Error::abort(
                DapProblemType::ReportRejected,
                Some(task_id),
                "report is too old",
            ));
        }
        if in_any(&self.collected_intervals(&task_id).await?, t) {
            return Err(Error::abort(
                DapProblemType::ReportRejected,
                Some(task_id),
                "the report's batch has already been collected",
            ));
        }
        let wait = self.uploads.push(NewReport {
            task_id,
            report_id: report.metadata.id,
            time: t,
            encoded: body.to_vec(),
        })?;
        wait.await
            .map_err(|_| Error::Internal("the report writer has stopped".into()))?
            .map_err(Error::Internal)
    }
}

/// Bytes a sealed `PlaintextInputShare` adds to its VDAF share: the length prefixes of its
/// extension list (2) and payload (4), and the AEAD tag (16 for every RFC 9180 AEAD that seals).
const SEALED_OVERHEAD: usize = 2 + 4 + 16;
/// The most extension bytes a `PlaintextInputShare` holds (`extensions<0..2^16-1>`).
const MAX_EXTENSIONS: usize = u16::MAX as usize;
/// The longest encapsulated key of an RFC 9180 KEM (DHKEM(P-521)'s).
const MAX_ENCAPSULATED_KEY: usize = 133;

/// The longest encoded `Report` whose parts [`check_lengths`] accepts: its metadata (ID and
/// time), the public share's length prefix and bytes, and two `HpkeCiphertext`s (config ID,
/// length-prefixed encapsulated key and payload), the Helper's with a full extension list.
fn max_report_len(lengths: &ShareLengths) -> usize {
    let ciphertext = 1 + 2 + MAX_ENCAPSULATED_KEY + 4;
    16 + 8
        + 4
        + lengths.public
        + ciphertext
        + lengths.leader
        + SEALED_OVERHEAD
        + ciphertext
        + lengths.helper
        + SEALED_OVERHEAD
        + MAX_EXTENSIONS
}

/// The length of an encoded `Report` of a VDAF with these share lengths as Duet's clients make
/// it: metadata, the public share and two X25519 `HpkeCiphertext`s with no extensions.
pub(crate) fn typical_report_len(lengths: &ShareLengths) -> usize {
    let ciphertext = 1 + 2 + 32 + 4 + SEALED_OVERHEAD;
    16 + 8 + 4 + lengths.public + 2 * ciphertext + lengths.leader + lengths.helper
}

/// Checks the sizes of a report's parts against its task's VDAF, before it is stored and later
/// loaded with its job's other reports: the public share has the VDAF's length, and so does the
/// Leader's input share sealed without extensions (Duet's tasks define none, so an extension
/// there would make the report invalid when it is prepared); the Helper's, which may carry
/// extensions meant for the Helper alone, is at most a full extension list longer. So one
/// client's oversized report cannot swell a job past what the Helper accepts, which would cost
/// the job's other reports.
fn check_lengths(report: &ReportRef<'_>, lengths: &ShareLengths) -> Result<(), String> {
    if report.public_share.len() != lengths.public {
        return Err(format!(
            "the public share is {} bytes; this task's VDAF makes {}",
            report.public_share.len(),
            lengths.public
        ));
    }
    let leader = &report.leader_encrypted_input_share;
    let helper = &report.helper_encrypted_input_share;
    for (whose, share) in [("Leader", leader), ("Helper", helper)] {
        if share.encapsulated_key.len() > MAX_ENCAPSULATED_KEY {
            return Err(format!(
                "the {whose}'s encapsulated key is {} bytes; no HPKE KEM uses more than {}",
                share.encapsulated_key.len(),
                MAX_ENCAPSULATED_KEY
            ));
        }
    }
    let sealed = lengths.leader + SEALED_OVERHEAD;
    if leader.payload.len() != sealed {
        return Err(format!(
            "the Leader's encrypted input share is {} bytes; this task's VDAF makes {} \
             (its input share sealed without extensions, which this task does not use)",
            leader.payload.len(),
            sealed
        ));
    }
    let shortest = lengths.helper + SEALED_OVERHEAD;
    let longest = shortest + MAX_EXTENSIONS;
    if !(shortest..=longest).contains(&helper.payload.len()) {
        return Err(format!(
            "the Helper's encrypted input share is {} bytes; this task's VDAF makes {shortest} \
             to {longest} (its input share sealed with up to {MAX_EXTENSIONS} bytes of \
             extensions)",
            helper.payload.len(),
        ));
    }
    Ok(())
}

/// Batches the writer may have written but not yet seen durable while it writes the next.
const MAX_UNFLUSHED_BATCHES: usize = 4;

/// Drains the upload queue, writing up to `upload_batch_size` reports and `upload_batch_bytes`
/// per transaction, and answers each batch's uploads once the store says they are durable: a
/// store may return before then (see `Datastore::put_reports_pipelined`), and the writer goes on
/// with the next batch meanwhile. On shutdown it stops taking new uploads, writes the ones
/// already queued and waits for all of them to be durable.
pub(super) async fn run_report_writer(
    leader: Arc<Leader>,
    mut rx: mpsc::Receiver<PendingUpload>,
    mut shutdown: watch::Receiver<bool>,
) {
    let max = leader.shared.config.upload_batch_size.max(1);
    let max_bytes = leader.shared.config.upload_batch_bytes;
    let mut batch: Vec<PendingUpload> = Vec::with_capacity(max);
    // An upload taken from the queue that did not fit the last batch: the next one's first.
    let mut carried = None;
    let mut unflushed = tokio::task::JoinSet::new();
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => {
                        rx.close();
                        rx.recv().await
                    }
                };
                match next {
                    Some(first) => first,
                    None => break,
                }
            }
        };
        carried = fill_batch(&mut rx, &mut batch, first, max, max_bytes);
        let (reports, waiters): (Vec<NewReport>, Vec<_>) =
            batch.drain(..).map(|p| (p.report, p.done)).unzip();
        let result = leader
            .shared
            .metrics
            .time(
                StoreOp::PutReports,
                leader.shared.store.put_reports_pipelined(&reports),
            )
            .await;
        match result {
            Ok((_, Durable::Now)) => answer(waiters, Ok(())),
            Ok((_, durable)) => {
                while unflushed.len() >= MAX_UNFLUSHED_BATCHES {
                    unflushed.join_next().await;
                }
                unflushed.spawn(async move {
                    answer(waiters, durable.wait().await.map_err(failed));
                });
            }
            Err(e) => answer(waiters, Err(failed(e))),
        }
        // Written reports are visible to job creation, durable or not yet: anything that reads
        // them commits after them.
        leader.wake_job_creator.notify_one();
    }
    while unflushed.join_next().await.is_some() {}
}

/// Puts `first` and then the uploads already queued into `batch`, up to `max` of them and
/// `max_bytes` of reports (`first` goes in whatever its size). Returns the upload taken that
/// did not fit, if any.
fn fill_batch(
    rx: &mut mpsc::Receiver<PendingUpload>,
    batch: &mut Vec<PendingUpload>,
    first: PendingUpload,
    max: usize,
    max_bytes: usize,
) -> Option<PendingUpload> {
    let mut bytes = first.report.encoded.len();
    batch.push(first);
    while batch.len() < max {
        let Ok(next) = rx.try_recv() else {
            return None;
        };
        bytes = bytes.saturating_add(next.report.encoded.len());
        if bytes > max_bytes {
            return Some(next);
        }
        batch.push(next);
    }
    None
}

/// Logs a failure to store uploads, as the answer to give them.
fn failed(e: duet_store::StoreError) -> String {
    tracing::error!(error = %e, "storing uploaded reports failed");
    e.to_string()
}

/// Answers a batch's uploads.
fn answer(waiters: Vec<oneshot::Sender<Result<(), String>>>, outcome: Result<(), String>) {
    for done in waiters {
        // A client that went away doesn't need an answer.
        let _ = done.send(outcome.clone());
    }
}

#[cfg(test)]
mod tests {
    use duet_messages::dap09::{ReportId, Time};

    use super::*;

    fn upload(bytes: usize) -> PendingUpload {
        PendingUpload {
            report: NewReport {
                task_id: TaskId([0; 32]),
                report_id: ReportId::random(),
                time: Time(0),
                encoded: vec![0; bytes],
            },
            done: oneshot::channel().0,
            _queued: None,
        }
    }

    fn report(bytes: usize) -> NewReport {
        NewReport {
            task_id: TaskId([0; 32]),
            report_id: ReportId::random(),
            time: Time(0),
            encoded: vec![0; bytes],
        }
    }

    /// The queue refuses an upload once its bytes are taken, whatever room its count leaves,
    /// and takes uploads again as the writer takes them out; a report longer than the whole
    /// budget waits for an empty queue.
    #[tokio::test]
    async fn the_upload_queue_holds_to_its_bytes() {
        let (queue, mut rx) = UploadQueue::new(100, 4 * 1024);
        let overloaded = |r: Result<_, Error>| matches!(r, Err(Error::Overloaded));
        queue.push(report(1500)).expect("2 KiB of 4");
        queue.push(report(2048)).expect("4 KiB of 4");
        assert!(overloaded(queue.push(report(1))));
        drop(rx.try_recv().expect("the first upload"));
        assert!(overloaded(queue.push(report(2049))), "3 KiB, 2 free");
        queue.push(report(2000)).expect("4 KiB of 4 again");
        assert!(overloaded(queue.push(report(10_000))));
        drop((rx.try_recv(), rx.try_recv()));
        queue.push(report(10_000)).expect("alone in the queue");
        assert!(overloaded(queue.push(report(1))));
        drop(rx.try_recv().expect("the long upload"));
        queue.push(report(1)).expect("room again");
        // The count bound still holds for small reports.
        let (queue, _rx) = UploadQueue::new(2, 1 << 20);
        queue.push(report(1)).expect("first");
        queue.push(report(1)).expect("second");
        assert!(overloaded(queue.push(report(1))));
    }

    /// Batches stop before the report that would take them past the byte or count limit; that
    /// report starts the next batch, and a report over the byte limit goes alone.
    #[tokio::test]
    async fn batches_hold_to_their_byte_and_count_limits() {
        let (tx, mut rx) = mpsc::channel(16);
        for bytes in [100, 100, 100, 250, 300, 10, 10, 10] {
            tx.try_send(upload(bytes)).expect("queue");
        }
        let mut sizes = Vec::new();
        let mut carried = None;
        while let Some(first) = carried.take().or_else(|| rx.try_recv().ok()) {
            let mut batch = Vec::new();
            carried = fill_batch(&mut rx, &mut batch, first, 2, 250);
            sizes.push(
                batch
                    .iter()
                    .map(|p| p.report.encoded.len())
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(
            sizes,
            vec![
                vec![100, 100],
                vec![100],
                vec![250],
                vec![300],
                vec![10, 10],
                vec![10]
            ]
        );
    }
}
