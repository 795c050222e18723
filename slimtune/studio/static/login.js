// Login page: posts the password as JSON; the server answers with an HttpOnly session cookie.
const form = document.getElementById("login-form");
const error = document.getElementById("login-error");

async function goIfLoggedIn() {
  const r = await fetch("/api/auth/status");
  if (r.ok && (await r.json()).authenticated) location.replace("/");
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  error.classList.add("hidden");
  const password = document.getElementById("password").value;
  const r = await fetch("/api/auth/login", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ password }),
  });
  if (r.ok) { location.replace("/"); return; }
  let detail = `Login failed (HTTP ${r.status}).`;
  try { detail = (await r.json()).detail || detail; } catch { /* not JSON */ }
  error.textContent = detail;
  error.classList.remove("hidden");
});

goIfLoggedIn();
