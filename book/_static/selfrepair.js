/* Display math wider than its column scrolls in its own box (selfrepair.css); a box that scrolls
   is marked here (data-scrolls on the div.math around it), and the CSS writes a cue under it, in
   words: a shadow at the screen's edge alone read as the equation cut off (read3 #20, a phone).
   Re-marked when MathJax has typeset and whenever the page is resized. */
(function () {
  function mark() {
    document.querySelectorAll('mjx-container[display="true"]').forEach(function (m) {
      var box = m.closest('div.math') || m.parentElement;
      if (!box) return;
      if (m.scrollWidth > m.clientWidth + 1) box.setAttribute('data-scrolls', 'sideways');
      else box.removeAttribute('data-scrolls');
    });
  }
  function whenTypeset() {
    var mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) mj.startup.promise.then(mark);
    else mark();
  }
  if (document.readyState === 'complete') whenTypeset();
  else window.addEventListener('load', whenTypeset);
  window.addEventListener('resize', mark);
})();
