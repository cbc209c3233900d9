//! Progress bars for long work (restores, saves).

use super::*;

/// Waits for `call` (a RestoreShard) and meanwhile shows the daemon's
/// progress on it (from `Status`) as a bar, once it is fetching bytes.
pub(crate) async fn with_restore_progress<T>(
    call: impl std::future::Future<Output = T>,
    admin: &mut AdminClient<Channel>,
    selector: &pb::ShardSelector,
    json: bool,
) -> T {
    let mut call = std::pin::pin!(call);
    let mut ticks = tokio::time::interval(std::time::Duration::from_millis(250));
    let mut bar: Option<ProgressBar> = None;
    let is_ours = |p: &&pb::RestoreProgress| {
        p.shard.as_ref().is_some_and(|s| {
            s.job == selector.job
                && s.rank == selector.rank
                && selector.step.is_none_or(|step| s.step == step)
                && (selector.tenant.is_empty() || s.tenant == selector.tenant)
        })
    };
    loop {
        tokio::select! {
            out = &mut call => {
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                return out;
            }
            _ = ticks.tick(), if !json => {
                let Ok(status) = admin.status(pb::StatusRequest {}).await else { continue };
                if let Some(progress) = status.get_ref().restores.iter().find(is_ours) {
                    let bar = bar.get_or_insert_with(|| progress_bar(0, "restore"));
                    show_restore_progress(bar, progress);
                }
            }
        }
    }
}

/// Moves `bar` to a running restore's position, naming its sources.
pub(crate) fn show_restore_progress(bar: &ProgressBar, progress: &pb::RestoreProgress) {
    bar.set_length(progress.total_bytes);
    bar.set_position(progress.done_bytes);
    bar.set_prefix(bytes_from(&progress_sources(progress)));
}

pub(crate) fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {prefix}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}
