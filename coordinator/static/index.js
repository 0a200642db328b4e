// Carry this page's fragment (token, nodes) over to the chat and the dashboard.
"use strict";

for (const link of document.querySelectorAll("a.keep-fragment")) {
  link.addEventListener("click", () => {
    link.href = link.getAttribute("href").split("#")[0] + window.location.hash;
  });
}
