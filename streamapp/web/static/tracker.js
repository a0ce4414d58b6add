/* streamapp browser tracker: records clicks and keydowns and POSTs them to streamapp's
 * /api/events in batches. No dependencies, no build step:
 *
 *   <script src="http://localhost:8000/tracker.js"></script>
 *   <script>streamapp.init({flushInterval: 2000})</script>
 *
 * Never recorded: keys typed into a sensitive field (see `sensitive`), and anything (clicks, keys)
 * inside an element marked data-streamapp-ignore. Such keydowns are skipped entirely, not sent
 * redacted: even a redacted keydown carries its `code` (the physical key) and its timing.
 * page_url is the page's origin and path only (plus the query parameters listed in keepParams):
 * queries and fragments carry reset tokens, `#access_token=` and what was typed into a search.
 */
(function () {
  'use strict';
  if (window.streamapp) return; // loaded twice: keep the first instance and its queue

  // A keepalive fetch (and sendBeacon) may carry at most 64 KiB in flight per page; stay under it.
  var MAX_BATCH_BYTES = 60 * 1024;
  var BACKOFF_BASE_MS = 500;
  var BACKOFF_MAX_MS = 30000;
  var SESSION_KEY = 'streamapp.session_id';
  var ANONYMOUS_KEY = 'streamapp.anonymous_id';

  var script = document.currentScript;
  var config = {
    // By default, the server this script was loaded from.
    endpoint: script && script.src ? new URL('/api/events', script.src).href : '/api/events',
    writeKey: null,
    flushInterval: 5000,
    maxBatch: 100,
    maxQueue: 1000,
    userId: null,
    keepParams: [] // query parameters page_url keeps, e.g. ['utm_source', 'utm_campaign']
  };
  var queue = [];
  var sending = false;
  var attempt = 0; // consecutive failed sends, for the backoff
  var retryTimer = null;
  var flushTimer = null;
  var started = false;
  var drainTo = 0; // flush() sends until the event numbered this has left
  var stats = {recorded: 0, sent: 0, dropped: 0, retries: 0};
  var encoder = new TextEncoder();

  function uuid() {
    if (crypto.randomUUID) return crypto.randomUUID(); // secure contexts (https, localhost) only
    var b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    var h = Array.prototype.map.call(b, function (x) { return (x + 0x100).toString(16).slice(1); }).join('');
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
  }

  // An id kept in web storage; storage can be disabled (privacy settings, sandboxed iframes),
  // then the id lives as long as the page.
  function storedId(storage, key) {
    try {
      var id = window[storage].getItem(key);
      if (!id) window[storage].setItem(key, id = uuid());
      return id;
    } catch (e) {
      return uuid();
    }
  }

  var sessionId = storedId('sessionStorage', SESSION_KEY); // per tab
  var anonymousId = null;

  // "button#buy.primary"; an element without an id is prefixed with up to two ancestors, stopping
  // at one with an id: "form#signup > div.row > input.email".
  function describe(el) {
    var s = el.tagName.toLowerCase();
    if (el.id) s += '#' + el.id;
    var cls = (el.getAttribute('class') || '').trim(); // also right for SVG, whose className is an object
    if (cls) s += '.' + cls.split(/\s+/).slice(0, 3).join('.');
    return s;
  }

  function selector(el) {
    var parts = [];
    for (var i = 0; el && el.nodeType === 1 && i < 3; i++, el = el.parentElement) {
      parts.unshift(describe(el));
      if (el.id) break;
    }
    return parts.join(' > ').slice(0, 256);
  }

  function ignored(el) {
    return !!(el && el.closest && el.closest('[data-streamapp-ignore]'));
  }

  // autocomplete tokens of fields whose keys are secrets: any payment-card field (cc-number,
  // cc-csc, cc-exp, cc-exp-month, cc-name...), one-time codes and passwords.
  var SECRET_AUTOCOMPLETE = /^(cc-.*|one-time-code|current-password|new-password)$/;

  // A field whose keystrokes are never recorded: <input type=password>; an `autocomplete` naming a
  // card, a one-time code or a password (a "show password" button that turns the field into
  // type=text keeps it); inputmode=numeric, the digit keypad of codes, PINs and card numbers
  // (nothing else tells them from a quantity field).
  function sensitive(el) {
    if (!el || !el.getAttribute) return false;
    if (el.tagName === 'INPUT' && el.type === 'password') return true;
    if ((el.getAttribute('inputmode') || '').trim().toLowerCase() === 'numeric') return true;
    var tokens = (el.getAttribute('autocomplete') || '').toLowerCase().split(/\s+/);
    for (var i = 0; i < tokens.length; i++) if (SECRET_AUTOCOMPLETE.test(tokens[i])) return true;
    return false;
  }

  // Origin and path, then only the query parameters named in keepParams, in the page's order and
  // encoding; never the fragment (nor any user:password@, which location.host leaves out).
  function pageUrl() {
    var base = location.protocol + '//' + location.host + location.pathname;
    var keep = config.keepParams;
    if (!keep.length || location.search.length < 2) return base;
    var kept = location.search.slice(1).split('&').filter(function (pair) {
      var name = pair.split('=')[0].replace(/\+/g, ' ');
      try { name = decodeURIComponent(name); } catch (e) { /* a stray %: compare it as it is */ }
      return keep.indexOf(name) >= 0;
    });
    return kept.length ? base + '?' + kept.join('&') : base;
  }

  function record(event, target) {
    event.event_id = uuid();
    event.timestamp = new Date().toISOString();
    event.session_id = sessionId;
    event.user_id = config.userId || anonymousId || (anonymousId = storedId('localStorage', ANONYMOUS_KEY));
    event.page_url = pageUrl();
    if (target) event.target = selector(target);
    var json = JSON.stringify(event);
    var size = encoder.encode(json).length + 1; // + its comma in the batch
    stats.recorded++;
    if (size + 2 > MAX_BATCH_BYTES) { // it could never be sent (and the server refuses it too)
      stats.dropped++;
      console.warn('streamapp: dropped a ' + event.type + ' event of ' + size + ' bytes');
      return;
    }
    // Serialized once: a retry re-sends the same bytes, event_id and timestamp included.
    queue.push({n: stats.recorded, json: json, size: size});
    cap();
    if (queue.length >= config.maxBatch) flush();
  }

  function cap() {
    if (queue.length <= config.maxQueue) return;
    stats.dropped += queue.length - config.maxQueue;
    queue.splice(0, queue.length - config.maxQueue); // the oldest go first
  }

  function onClick(e) {
    if (ignored(e.target)) return;
    // pageX/pageY: document coordinates, so a spot on the page has one position however scrolled.
    record({type: 'click', x: Math.round(e.pageX), y: Math.round(e.pageY),
            button: Math.min(Math.max(e.button, 0), 4)}, e.target);
  }

  function onKeydown(e) {
    // The focused element itself, also inside an open shadow root (e.target would be its host).
    var el = e.composedPath()[0];
    if (ignored(el) || sensitive(el)) return;
    record({type: 'keydown', key: e.key, code: e.code, alt: e.altKey, ctrl: e.ctrlKey, meta: e.metaKey,
            shift: e.shiftKey, repeat: e.repeat}, el);
  }

  function url() {
    if (!config.writeKey) return config.endpoint;
    return config.endpoint + (config.endpoint.indexOf('?') < 0 ? '?' : '&') +
      'writeKey=' + encodeURIComponent(config.writeKey);
  }

  // Take the next batch off the queue: at most maxBatch events and MAX_BATCH_BYTES of JSON.
  function takeBatch() {
    var count = 0;
    var bytes = 2;
    while (count < queue.length && count < config.maxBatch && bytes + queue[count].size <= MAX_BATCH_BYTES) {
      bytes += queue[count++].size;
    }
    var items = queue.splice(0, count);
    return {items: items, body: '[' + items.map(function (i) { return i.json; }).join(',') + ']'};
  }

  // Seconds or an HTTP date, in milliseconds from now; 0 when absent or unreadable.
  function retryAfterMs(value) {
    if (!value) return 0;
    var ms = /^\d+$/.test(value) ? Number(value) * 1000 : Date.parse(value) - Date.now();
    return ms > 0 ? ms : 0;
  }

  function retry(batch, retryAfter) {
    // Back in front, the same bytes: the server stores a re-sent event_id once.
    queue = batch.items.concat(queue);
    cap();
    stats.retries++;
    var backoff = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * Math.pow(2, attempt++));
    var delay = Math.max(backoff / 2 + Math.random() * backoff / 2, retryAfterMs(retryAfter)); // "equal jitter"
    retryTimer = setTimeout(function () { retryTimer = null; send(); }, delay);
  }

  // Send everything recorded so far, in as many batches as it takes, one request at a time.
  function flush() {
    drainTo = stats.recorded;
    send();
  }

  function send() {
    if (sending || retryTimer || !queue.length) return;
    var batch = takeBatch();
    sending = true;
    fetch(url(), {method: 'POST', keepalive: true, body: batch.body, headers: {'Content-Type': 'text/plain'}})
      .then(function (r) {
        if (r.status === 429 || r.status >= 500) return retry(batch, r.headers.get('Retry-After'));
        attempt = 0;
        if (r.ok) {
          stats.sent += batch.items.length;
          return r.json().then(function (body) {
            if (body.rejected) console.warn('streamapp: the server rejected ' + body.rejected + ' events', body.errors);
          });
        }
        // Another 4xx will not change on a retry; a 422 lists why each event was rejected.
        stats.dropped += batch.items.length;
        return r.text().then(function (text) {
          console.warn('streamapp: dropped ' + batch.items.length + ' events: HTTP ' + r.status + ' ' + text);
        });
      }, function () { retry(batch, null); }) // network error: the request may or may not have landed
      .catch(function () {}) // an unreadable response body: the status decided already
      .then(function () {
        sending = false;
        if (queue.length && (queue[0].n <= drainTo || queue.length >= config.maxBatch)) send();
      });
  }

  // The page is going away (or may be discarded while hidden): hand what is queued to the browser,
  // which sends it after the page is gone. A beacon has no response, so no retry.
  function flushOnHide() {
    while (queue.length) {
      var batch = takeBatch();
      if (!navigator.sendBeacon(url(), new Blob([batch.body], {type: 'text/plain'}))) {
        queue = batch.items.concat(queue); // over the browser's quota: kept, for if the page comes back
        return;
      }
      stats.sent += batch.items.length;
    }
  }

  function init(options) {
    for (var k in options) {
      if (Object.prototype.hasOwnProperty.call(config, k) && options[k] !== undefined) config[k] = options[k];
    }
    if (!Array.isArray(config.keepParams)) {
      console.warn('streamapp: keepParams must be an array of parameter names; keeping none');
      config.keepParams = [];
    }
    clearInterval(flushTimer);
    flushTimer = setInterval(flush, config.flushInterval);
    if (started) return;
    started = true;
    // Capture phase: a handler on the page that stops propagation does not hide the event.
    document.addEventListener('click', onClick, true);
    document.addEventListener('auxclick', onClick, true); // middle and right buttons
    document.addEventListener('keydown', onKeydown, true);
    window.addEventListener('pagehide', flushOnHide);
    document.addEventListener('visibilitychange', function () {
      if (document.visibilityState === 'hidden') flushOnHide();
    });
  }

  window.streamapp = {
    init: init,
    flush: flush,
    // Counters since the page loaded; `sent` counts events the server took or a beacon carried.
    stats: function () { return {recorded: stats.recorded, sent: stats.sent, dropped: stats.dropped,
                                 retries: stats.retries, pending: queue.length}; }
  };
})();
