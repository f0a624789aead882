// Drives model/server/web_chat.html's chat logic (makeChat) under node with a fake page and a fake server, for
// tests/test_web_chat.py: node tests/web_chat_driver.js <page.html>  ->  one JSON object of what happened.
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const script = html.match(/<script>([\s\S]*?)<\/script>/)[1];
const context = {AbortController, TextDecoder, TextEncoder, JSON, Date, console};
vm.createContext(context);
vm.runInContext(script + "\nthis.makeChat = makeChat;", context);

const elements = {}, bubbles = [];
const element = id => (elements[id] = elements[id] || {value: "", textContent: "", disabled: false, className: ""});
element("temperature").value = "0.7";
const page = {element, bubble(role, text) { const b = {role, textContent: text, className: "msg " + role}; bubbles.push(b); return b; }};

// The fake server: each chat request gets a stream whose chunks the scenario pushes; abort rejects a pending read.
const requests = [], streams = [];
function sse(obj) { return new TextEncoder().encode("data: " + (typeof obj === "string" ? obj : JSON.stringify(obj)) + "\n\n"); }
async function fakeFetch(url, init) {
  if (url === "/v1/models") return {ok: true, json: async () => ({object: "list", data: [{id: "final"}]})};
  requests.push(JSON.parse(init.body));
  const queue = [], waiting = [];
  const stream = {
    push(value) { waiting.length ? waiting.shift().resolve({done: false, value}) : queue.push({done: false, value}); },
    end() { waiting.length ? waiting.shift().resolve({done: true}) : queue.push({done: true}); },
  };
  init.signal.addEventListener("abort", () => {
    const err = new Error("aborted"); err.name = "AbortError";
    while (waiting.length) waiting.shift().reject(err);
  });
  streams.push(stream);
  return {ok: true, body: {getReader: () => ({read: () => queue.length ? Promise.resolve(queue.shift())
                                                    : new Promise((resolve, reject) => waiting.push({resolve, reject}))})}};
}
const tick = () => new Promise(r => setTimeout(r, 0));
const delta = d => ({choices: [{index: 0, delta: d}]});

(async () => {
  const chat = context.makeChat(page, fakeFetch), result = {};
  await chat.showModel();
  result.model = element("model").textContent;
  // 1. a reply streams; a second send meanwhile is refused; stop keeps the part shown
  const first = chat.send("你好");
  await tick();
  streams[0].push(sse(delta({content: "你"})));
  await tick();
  result.busyWhileStreaming = chat.busy();
  result.buttonsWhileStreaming = {send: element("send").disabled, stop: element("stop").disabled};
  result.secondSendAccepted = await chat.send("再说一遍");
  result.requestsWhileStreaming = requests.length;
  chat.stop();
  await first;
  result.afterStop = {busy: chat.busy(), history: JSON.parse(JSON.stringify(chat.history)),
                      buttons: {send: element("send").disabled, stop: element("stop").disabled}};
  // 2. with tools set, a streamed tool call is shown and kept in the history
  element("tools").value = JSON.stringify([{type: "function", function: {name: "get_weather", parameters: {type: "object"}}}]);
  const second = chat.send("北京天气");
  await tick();
  streams[1].push(sse(delta({role: "assistant", content: ""})));
  streams[1].push(sse(delta({content: "", tool_calls: [{index: 0, id: "call_0", type: "function",
                                     function: {name: "get_weather", arguments: "{\"city\": \"北京\"}"}}]})));
  streams[1].push(sse({choices: [], usage: {prompt_tokens: 9, completion_tokens: 7, total_tokens: 16}}));
  streams[1].push(sse("[DONE]"));
  streams[1].end();
  await second;
  result.secondRequest = requests[1];
  result.history = JSON.parse(JSON.stringify(chat.history));
  result.bubbles = bubbles.map(b => [b.role, b.textContent]);
  console.log(JSON.stringify(result));
})().catch(e => { console.error(e); process.exit(1); });
