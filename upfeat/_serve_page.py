"""The single HTML page of ``upfeat serve`` (see :mod:`upfeat.serve`).

:func:`render_page` fills in the server's options as one JSON object; the script builds the
menus from it, posts the raw file bytes to ``/api/run`` and shows the three PNGs it gets back.
Every server-supplied string is inserted with ``textContent`` / ``option.text``, never as HTML.
"""
from __future__ import annotations

import json

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>upfeat demo</title>
<style>
 body { font: 15px system-ui, sans-serif; margin: 1.5em; color: #222; }
 form > * { margin-right: .8em; }
 #error { color: #b00020; font-weight: 600; min-height: 1.2em; }
 #result { display: flex; gap: 12px; flex-wrap: wrap; margin-top: 1em; }
 figure { margin: 0; } figcaption { font-size: 13px; color: #555; }
 #result img { width: 360px; height: auto; image-rendering: pixelated; border: 1px solid #ccc; }
</style></head>
<body>
<h1>upfeat: sharp features, live</h1>
<p id="note"></p>
<form id="form" onsubmit="return false">
 <input type="file" id="file" accept="image/*">
 <label>backbone <select id="backbone"></select></label>
 <label>upsampler <select id="upsampler"></select></label>
 <button type="button" id="run">Upsample features</button>
</form>
<p id="status"></p><p id="error" role="alert"></p>
<div id="result" data-state="empty"></div>
<script>
const CFG = __CONFIG__;
const $ = (id) => document.getElementById(id);
$("note").textContent = "Images are downscaled so that their longer side is at most " +
  CFG.max_side + " px before inference; uploads up to " + CFG.max_upload_mb + " MB. " +
  "Colours: the first three PCA components of the low-res features, the same for both maps. " +
  "Uploaded images are not kept.";
function fill(select, names, preferred) {
  select.replaceChildren(...names.map((n) => new Option(n, n)));
  if (names.includes(preferred)) select.value = preferred;
}
function fillUpsamplers() {
  const names = CFG.upsamplers[$("backbone").value] || [];
  fill($("upsampler"), names, names.includes("jbu") ? "jbu" : "bilinear");
}
fill($("backbone"), CFG.backbones, CFG.default_backbone);
fillUpsamplers();
$("backbone").onchange = fillUpsamplers;
function fail(message) {
  $("error").textContent = message; $("status").textContent = "";
  $("result").replaceChildren(); $("result").dataset.state = "error";
}
function figure(id, caption, src) {
  const f = document.createElement("figure"), img = new Image(), c = document.createElement("figcaption");
  img.id = id; img.alt = caption; img.src = src; c.textContent = caption;
  f.append(img, c); return f;
}
$("run").onclick = async () => {
  const file = $("file").files[0];
  $("error").textContent = ""; $("result").replaceChildren();
  if (!file) return fail("Choose an image file first.");
  if (file.size > CFG.max_upload_mb * 1e6)
    return fail("The file is " + (file.size / 1e6).toFixed(1) + " MB, over the " +
                CFG.max_upload_mb + " MB upload limit.");
  const q = new URLSearchParams({backbone: $("backbone").value, upsampler: $("upsampler").value,
                                 name: file.name});
  $("run").disabled = true; $("result").dataset.state = "running";
  $("status").textContent = "Running " + q.get("backbone") + " + " + q.get("upsampler") + " ...";
  try {
    const r = await fetch("/api/run?" + q, {method: "POST", body: file});
    const j = await r.json().catch(() => ({error: "The server answered " + r.status + " " + r.statusText + "."}));
    if (!r.ok) return fail(j.error);
    const t = j.timing_ms, [w, h] = j.size, [gh, gw] = j.grid;
    $("result").replaceChildren(
      figure("out-image", "image " + w + " x " + h + " (from " + j.original_size.join(" x ") + ")", j.image),
      figure("out-lowres", "low-res " + j.backbone + " features, " + gw + " x " + gh + " x " + j.dim, j.lowres),
      figure("out-upsampled", j.upsampler + " upsampled, " + w + " x " + h + " x " + j.dim, j.upsampled));
    $("status").textContent = "Done in " + (t.total / 1000).toFixed(2) + " s (model load " +
      t.load.toFixed(0) + " ms, backbone " + t.backbone.toFixed(0) + " ms, upsampler " +
      t.upsampler.toFixed(0) + " ms, PCA + PNG " + t.render.toFixed(0) + " ms).";
    $("result").dataset.state = "done";
  } catch (e) {
    fail("Upload failed: " + e.message);
  } finally {
    $("run").disabled = false;
  }
};
</script></body></html>
"""


def render_page(config: dict) -> bytes:
    """The page as UTF-8, with ``config`` (see :meth:`upfeat.serve.Demo.options`) embedded."""
    blob = json.dumps(config).replace("<", "\\u003c")  # no "</script>" can end the script early
    return _PAGE.replace("__CONFIG__", blob).encode()
