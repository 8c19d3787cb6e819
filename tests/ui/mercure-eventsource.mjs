// The npm `eventsource` client (what Node applications use) subscribed to a Mercure hub, for
// tests/api/mercure_clients.rs. Usage: node mercure-eventsource.mjs URL TOKEN. Prints one JSON
// object a line for each open, message and error, and reconnects as the client does by itself.
import { EventSource } from 'eventsource';

const [url, token] = process.argv.slice(2);
const print = (what) => process.stdout.write(JSON.stringify(what) + '\n');
const source = new EventSource(url, {
  fetch: (input, init) =>
    fetch(input, { ...init, headers: { ...init.headers, Authorization: `Bearer ${token}` } }),
});
source.onopen = () => print({ kind: 'open' });
source.onmessage = (e) => print({ kind: 'message', id: e.lastEventId, data: e.data });
source.onerror = () => print({ kind: 'error' });
