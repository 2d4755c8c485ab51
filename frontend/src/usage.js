// The usage history sections of pages other than a VM's (a user's page): each
// <section data-usage-url> drawn by history.js from its API.
import { mountHistory } from "./history.js";

for (const section of document.querySelectorAll("section[data-usage-url]")) mountHistory(section);
