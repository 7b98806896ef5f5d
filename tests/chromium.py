"""A real headless Chromium for the HTML report tests: find it, load a page, read what it shows.

The browser is resolved from ``$AGENTGUARD_CHROMIUM`` (a path or a command name), then the
names ``chromium``, ``chromium-browser``, ``google-chrome`` on ``PATH``. Without one the tests
skip — except with ``CI=true``, where a missing browser fails them. ``scripts/test.sh`` installs
Debian's ``chromium`` when it is missing and runs as root.

:func:`probe` loads a page with a small script inserted at the top of ``<head>`` (it records
Content-Security-Policy violations, script errors and every resource the page fetched) and one
at the end of ``<body>`` (after the page's own script ran it collects the visible text, the
waterfall sections, the chart, and what the task selector does when used). Chromium's
``--dump-dom`` prints the DOM after the page settled; the collected JSON is read back from it.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

ENV_VAR = "AGENTGUARD_CHROMIUM"
NAMES = ("chromium", "chromium-browser", "google-chrome")

# Flags that keep Chromium itself from calling home, so its log has only the page's activity.
_QUIET = (
    "--headless",
    "--disable-gpu",
    "--no-sandbox",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--metrics-recording-only",
    "--mute-audio",
    "--hide-scrollbars",
)


class BrowserNotFoundError(LookupError):
    """No Chromium: neither ``$AGENTGUARD_CHROMIUM`` nor a known name on ``PATH``."""


def find_browser(environ: dict[str, str] | None = None) -> str:
    """The browser's path: ``$AGENTGUARD_CHROMIUM`` first, then the known names on ``PATH``."""
    env = os.environ if environ is None else environ
    path = env.get("PATH", "")
    explicit = env.get(ENV_VAR)
    if explicit:
        found = shutil.which(explicit, path=path)
        if found is None:
            raise BrowserNotFoundError(f"${ENV_VAR}={explicit!r} is not an executable")
        return found
    for name in NAMES:
        found = shutil.which(name, path=path)
        if found is not None:
            return found
    raise BrowserNotFoundError(
        f"no Chromium: set ${ENV_VAR} or install one of {', '.join(NAMES)} "
        "(Debian: apt-get install chromium)"
    )


def require_browser(environ: dict[str, str] | None = None) -> str:
    """:func:`find_browser`, or skip the test — fail it when ``CI=true``."""
    env = os.environ if environ is None else environ
    try:
        return find_browser(env)
    except BrowserNotFoundError as exc:
        if env.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {exc}")
        pytest.skip(str(exc))


def run(browser: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run Chromium headless with a private profile; returns the finished process."""
    with tempfile.TemporaryDirectory(prefix="agentguard-chromium-") as profile:
        return subprocess.run(
            [browser, *_QUIET, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


_EARLY = """<script>
window.__probe={violations:[],errors:[]};
document.addEventListener('securitypolicyviolation',function(e){
  window.__probe.violations.push(e.violatedDirective+' '+e.blockedURI);});
window.addEventListener('error',function(e){window.__probe.errors.push(String(e.message));});
</script>"""

_LATE = """<script>
window.addEventListener('load',function(){setTimeout(function(){
  var p=window.__probe;
  function visibleTasks(){var out=[];var s=document.querySelectorAll('section.task');
    for(var i=0;i<s.length;i++){if(s[i].offsetParent!==null){out.push(s[i].id);}}return out;}
  p.jsReady=document.documentElement.getAttribute('data-js');
  p.text=document.body.innerText;
  p.title=document.title;
  p.headings=Array.prototype.map.call(document.querySelectorAll('h1,h2,h3'),
    function(h){return h.tagName+' '+h.textContent;});
  p.resources=performance.getEntriesByType('resource').map(function(r){return r.name;});
  p.images=document.images.length;
  p.pwned=window.__pwned||null;
  p.external=[];
  var all=document.querySelectorAll('*');
  for(var i=0;i<all.length;i++){var el=all[i];
    ['src','href','srcset','action','poster','xlink:href','data'].forEach(function(a){
      var v=el.getAttribute(a);
      if(v&&v.charAt(0)!=='#'&&v.indexOf('data:')!==0){p.external.push(el.tagName+' '+a+'='+v);}});
    var st=el.getAttribute('style');if(st&&/url\\(/i.test(st)){p.external.push('style '+st);}}
  p.sections=Array.prototype.map.call(document.querySelectorAll('section.task'),function(s){
    return {id:s.id,task:s.getAttribute('data-task-id'),visible:s.offsetParent!==null,
      rows:Array.prototype.map.call(s.querySelectorAll('table.wf tbody tr'),function(r){
        var bar=r.querySelector('.tl span');
        return {kind:r.getAttribute('data-kind'),
          cells:Array.prototype.map.call(r.cells,function(c){return c.innerText.trim();}),
          bar:bar?{left:bar.style.left,width:bar.style.width,
                   px:bar.getBoundingClientRect().width}:null};})};});
  var chart=document.querySelector('svg.chart');
  p.chart=chart?{bars:chart.querySelectorAll('rect.bar').length,
    title:chart.querySelector('title').textContent,desc:chart.querySelector('desc').textContent,
    labelledby:chart.getAttribute('aria-labelledby'),role:chart.getAttribute('role'),
    height:chart.getBoundingClientRect().height}:null;
  p.decisionKinds={};
  var rows=document.querySelectorAll('tr[data-kind]');
  for(var i=0;i<rows.length;i++){if(rows[i].closest('section.task')){continue;}
    p.decisionKinds[rows[i].getAttribute('data-kind')]=Array.prototype.map.call(rows[i].cells,
      function(c){return c.innerText.trim();});}
  var box=document.querySelector('section.task input.zoom-box');
  function bars(){return Array.prototype.map.call(
    box.closest('section.task').querySelectorAll('.tl span'),
    function(b){return [b.style.left,b.style.width];});}
  p.zoom=null;
  if(box){p.zoom={shown:box.closest('p').offsetParent!==null,checked:box.checked,
    label:box.parentNode.textContent,zoomed:bars()};
    box.click();p.zoom.full=bars();p.zoom.checkedAfter=box.checked;}
  p.visibleAtStart=visibleTasks();
  var sel=document.getElementById('task-select');
  p.switched=null;
  if(sel&&sel.options.length>2){
    sel.value=sel.options[2].value;sel.dispatchEvent(new Event('change'));
    var afterOne=visibleTasks();
    sel.value='all';sel.dispatchEvent(new Event('change'));
    p.switched={to:sel.options[2].value,visible:afterOne,all:visibleTasks()};}
  p.options=sel?sel.options.length:0;
  var out=document.createElement('pre');out.id='__probe';out.textContent=JSON.stringify(p);
  document.body.appendChild(out);
},50);});
</script>"""

_PROBE_RE = re.compile(r'<pre id="__probe">(.*?)</pre>', re.DOTALL)


def with_probe(page: str) -> str:
    """``page`` with the probe scripts inserted (top of ``<head>``, end of ``<body>``)."""
    head = page.index("<head>") + len("<head>")
    body_end = page.rindex("</body>")
    return page[:head] + _EARLY + page[head:body_end] + _LATE + page[body_end:]


def probe(
    browser: str, page: str, workdir: Path, name: str = "page.html"
) -> tuple[dict[str, Any], str]:
    """Load ``page`` (with the probe) from a file in Chromium; returns (probe data, log)."""
    path = workdir / name
    path.write_text(with_probe(page), encoding="utf-8")
    proc = run(
        browser,
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        path.as_uri(),
    )
    m = _PROBE_RE.search(proc.stdout)
    if m is None:
        raise AssertionError(
            f"Chromium (exit {proc.returncode}) printed no probe result; "
            f"stdout: {proc.stdout[-2000:]!r}; stderr: {proc.stderr[-3000:]!r}"
        )
    data: dict[str, Any] = json.loads(html.unescape(m.group(1)))
    return data, proc.stderr
