//! Watch streams: the initial events, bookmarks, and the faults that lag, stall or cut one stream.

use super::*;

impl Ctx {
    pub(super) fn watch(self) -> ApiResult<Response<Body>> {
        let keep = self.filter()?;
        let rv_param = self
            .query
            .get("resourceVersion")
            .cloned()
            .unwrap_or_default();
        let send_initial = truthy(&self.query, "sendInitialEvents");
        let bookmarks = truthy(&self.query, "allowWatchBookmarks");
        let from_rv = if send_initial || rv_param.is_empty() || rv_param == "0" {
            None
        } else {
            Some(rv_param.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("invalid resource version: {rv_param}"))
            })?)
        };
        let timeout = self
            .query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let selector = self.query.get("labelSelector").cloned().unwrap_or_default();
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
        let start = self.app.store.watch(&self.rt, from_rv);
        let mut epoch = self.app.faults.watch_epoch();
        epoch.mark_unchanged();
        // Taken before the stream's shape is first computed: no change can fall in between.
        let mut changes = self.app.faults.changes();
        changes.mark_unchanged();
        let this = Arc::new(self);
        tokio::spawn(async move {
            let start = match start {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Ok(line("ERROR", &e.status_json()))).await;
                    return;
                }
            };
            let mut out = Outbox {
                tx,
                held: VecDeque::new(),
                shape: this.watch_shape(&selector),
                changes,
                who: this.clone(),
                selector,
            };
            let mut last_rv = start.rv;
            for o in &start.initial {
                if this.in_scope(o) && keep(o) && !out.push(this.event_line("ADDED", o)).await {
                    return;
                }
            }
            if send_initial && bookmarks && !out.push(this.bookmark(start.rv, true)).await {
                return;
            }
            for ev in &start.backlog {
                if let Some(l) = this.render(ev, &keep)
                    && !out.push_committed(l, ev.at).await
                {
                    return;
                }
                last_rv = ev.rv;
            }
            let mut live = start.rx;
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            // Past `timeoutSeconds` while stalled: the stream stays open (half-open) until the
            // stall is lifted, then delivers what it held and ends.
            let mut expired = false;
            let mut tick = tokio::time::interval(this.app.bookmark_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick.tick().await;
            loop {
                out.refresh();
                if expired && !out.shape.stall {
                    out.flush().await;
                    return;
                }
                let due = out.next_due();
                tokio::select! {
                    _ = &mut deadline, if !expired => {
                        if !out.shape.stall {
                            return;
                        }
                        expired = true;
                    }
                    _ = epoch.changed() => return,
                    _ = out.tx.closed() => return,
                    _ = out.changes.changed() => out.reshape(),
                    _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                        if due.is_some() => {
                        if !out.deliver_due().await { return; }
                    }
                    _ = tick.tick(), if bookmarks && !out.shape.stall => {
                        // A bookmark must never run ahead of an event this watcher has not
                        // sent yet: read the version first, then drain everything committed
                        // up to it (commits publish under the lock that version is read under).
                        let rv = this.app.store.current_rv();
                        loop {
                            match live.try_recv() {
                                Ok(ev) => {
                                    if ev.rv <= last_rv { continue; }
                                    last_rv = ev.rv;
                                    if let Some(l) = this.render(&ev, &keep)
                                        && !out.push_committed(l, ev.at).await { return; }
                                }
                                Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                                Err(_) => return,
                            }
                        }
                        last_rv = last_rv.max(rv);
                        if !out.push(this.bookmark(last_rv, false)).await { return; }
                    }
                    ev = live.recv() => match ev {
                        Ok(ev) => {
                            if ev.rv <= last_rv { continue; }
                            last_rv = ev.rv;
                            if let Some(l) = this.render(&ev, &keep)
                                && !out.push_committed(l, ev.at).await { return; }
                        }
                        // A watcher too slow for the feed is ended; it resumes from its last
                        // resourceVersion out of the history, like after any dropped watch.
                        Err(_) => return,
                    }
                }
                if this.app.faults.snapshot().down || this.app.faults.is_partitioned(&this.ua) {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut r = Response::new(Body::from_stream(stream));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        Ok(r)
    }

    pub(super) fn watch_shape(&self, selector: &str) -> WatchShape {
        Faults::watch_shape(
            &self.app.faults.snapshot(),
            &self.ua,
            &self.rt.group,
            &self.rt.plural,
            selector,
        )
    }

    pub(super) fn in_scope(&self, o: &Value) -> bool {
        match self.ns() {
            Some(ns) => meta::namespace(o) == ns,
            None => true,
        }
    }

    pub(super) fn render(&self, ev: &Event, keep: &impl Fn(&Value) -> bool) -> Option<Bytes> {
        if ev.key != self.rt.store_key() || !self.in_scope(&ev.object) {
            return None;
        }
        let now = keep(&ev.object);
        let before = ev.old.as_deref().is_some_and(keep);
        // An object entering or leaving the selector is seen as added or deleted by this
        // watcher, as the apiserver's watch cache reports it.
        let t = match (ev.type_, before, now) {
            (EventType::Deleted, _, true) => "DELETED",
            (EventType::Deleted, _, false) => return None,
            (EventType::Added, _, true) => "ADDED",
            (EventType::Modified, true, true) => "MODIFIED",
            (EventType::Modified, false, true) => "ADDED",
            (EventType::Modified, true, false) => "DELETED",
            _ => return None,
        };
        // Most watchers send the stored object as is: serialize it once for all of them.
        let stored_as_served = self.repr == Repr::Full
            && !self.rt.is_event_view()
            && ev.object.get("apiVersion").and_then(Value::as_str)
                == Some(self.rt.api_version().as_str());
        if stored_as_served {
            let obj = ev.encoded();
            let mut out = Vec::with_capacity(obj.len() + 32);
            out.extend_from_slice(b"{\"type\":\"");
            out.extend_from_slice(t.as_bytes());
            out.extend_from_slice(b"\",\"object\":");
            out.extend_from_slice(obj);
            out.extend_from_slice(b"}\n");
            return Some(Bytes::from(out));
        }
        Some(self.event_line(t, &ev.object))
    }

    pub(super) fn event_line(&self, t: &str, obj: &Value) -> Bytes {
        line(t, &self.represent(obj))
    }

    pub(super) fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut md = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let (api_version, kind) = match self.repr {
            Repr::Metadata => (
                "meta.k8s.io/v1".to_string(),
                "PartialObjectMetadata".to_string(),
            ),
            _ => (self.rt.api_version(), self.rt.kind.clone()),
        };
        line(
            "BOOKMARK",
            &json!({"kind": kind, "apiVersion": api_version, "metadata": md}),
        )
    }
}

/// The sending side of one watch stream, with the events a [`crate::faults::WatchFault`]
/// holds back (lagging: until due; stalled: until lifted). Empty while the stream is not
/// faulted, so unfaulted streams send straight through.
pub(super) struct Outbox {
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    held: VecDeque<(tokio::time::Instant, Bytes)>,
    shape: WatchShape,
    /// Fault configuration changes since `shape` was computed.
    changes: tokio::sync::watch::Receiver<u64>,
    who: Arc<Ctx>,
    selector: String,
}

impl Outbox {
    fn reshape(&mut self) {
        self.shape = self.who.watch_shape(&self.selector);
    }

    /// Re-evaluate the stream's faults if the configuration changed. Called before every line
    /// is queued, so an event committed after a fault was set is always shaped by it (the
    /// select loop may see the event before it sees the change).
    fn refresh(&mut self) {
        if self.changes.has_changed().unwrap_or(false) {
            self.changes.mark_unchanged();
            self.reshape();
        }
    }

    /// Queue or send one line the server has now (the initial list, a bookmark); false when
    /// the stream must end (the client is gone, or more than `max_held` lines are held: the
    /// apiserver's slow-watcher close).
    async fn push(&mut self, l: Bytes) -> bool {
        self.push_had_at(l, tokio::time::Instant::now()).await
    }

    /// Queue or send the line of a change committed at `committed`. A lag counts from the
    /// commit, as in a lagging watch cache, not from when this stream took the change up: a
    /// stream resumed after its predecessor ended (its `timeoutSeconds`) with changes still
    /// held delivers them `lag` after their commit. Counted from the resume instead, a lag as
    /// long as the client's watch timeout held a change back through every resume for as long
    /// as the ends and the dues happened to fall.
    async fn push_committed(&mut self, l: Bytes, committed: std::time::Instant) -> bool {
        let age = committed.elapsed();
        let now = tokio::time::Instant::now();
        self.push_had_at(l, now.checked_sub(age).unwrap_or(now))
            .await
    }

    async fn push_had_at(&mut self, l: Bytes, had: tokio::time::Instant) -> bool {
        self.refresh();
        if self.shape.is_normal() && self.held.is_empty() {
            return self.tx.send(Ok(l)).await.is_ok();
        }
        if self.held.len() >= self.shape.max_held {
            tracing::warn!(
                held = self.held.len(),
                "closing a lagging/stalled watch: too many events held"
            );
            return false;
        }
        self.held.push_back((had, l));
        true
    }

    /// When the oldest held line is due (None: nothing held, or stalled).
    fn next_due(&self) -> Option<tokio::time::Instant> {
        if self.shape.stall {
            return None;
        }
        self.held.front().map(|(at, _)| *at + self.shape.lag)
    }

    /// Send every held line that is due, in order; false when the client is gone.
    async fn deliver_due(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        while let Some(due) = self.next_due()
            && due <= now
        {
            if let Some((_, l)) = self.held.pop_front()
                && self.tx.send(Ok(l)).await.is_err()
            {
                return false;
            }
        }
        true
    }

    /// Send everything held, now.
    async fn flush(&mut self) {
        while let Some((_, l)) = self.held.pop_front() {
            if self.tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
    }
}

pub(crate) fn line(t: &str, obj: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": t, "object": obj})).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}
